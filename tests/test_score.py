"""Offline scoring on Ray Data equals the in-process model's own top-k.

The expected answer is computed independently of slmrec.topk/recommend: the model's
full `logits` over all items, history items set to -inf, torch.topk.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from jobs.score import main as score_main
from pipelines.scoring import SUMMARY_FILE
from tests.tiny_serving import item_id, random_histories, tiny_model, write_prepared

K = 30  # with histories of up to 12 of 40 items, some users have fewer than K left


def expected_top_k(model, history: list[int], k: int) -> tuple[list[int], list[float]]:
    items = torch.tensor([history[-model.config.max_len:]])
    with torch.no_grad():
        out = model(items)
        logits = model.logits(model.last_position(out.hidden, out.mask))[0]
    logits[history] = float("-inf")
    available = int(torch.isfinite(logits).sum())
    scores, indices = torch.topk(logits, min(k, available))
    return [item_id(i) for i in indices.tolist()], scores.tolist()


def test_offline_top_k_equals_in_process_model(ray_session, tmp_path):
    histories = random_histories(23, seed=11)
    prepared = write_prepared(tmp_path / "prepared", histories, files=3)
    model = tiny_model(seed=4)
    model.save(tmp_path / "student" / "best")
    # The training job's output directory stands for its best/ model.
    summary = score_main(["--model", str(tmp_path / "student"), "--data", str(prepared),
                          "--output", str(tmp_path / "scores"), "--k", str(K),
                          "--batch-size", "5", "--chunk-size", "7", "--num-cpus", "2"])
    assert summary["users"] == len(histories)
    written = json.loads((tmp_path / "scores" / SUMMARY_FILE).read_text())
    assert (written["users"], written["k"], written["model"]) == (len(histories), K,
                                                                   str(tmp_path / "student" / "best"))
    assert not list(tmp_path.glob(".scores.tmp-*")), "staging directory left behind"

    rows = pq.read_table(tmp_path / "scores").to_pylist()
    assert sorted(r["user_id"] for r in rows) == sorted(f"u{i}" for i in range(len(histories)))
    short = 0
    for row in rows:
        history = histories[int(row["user_id"][1:])]
        items, scores = expected_top_k(model, history, K)
        assert row["items"] == items, row["user_id"]
        assert row["scores"] == pytest.approx(scores, abs=1e-4)
        short += len(items) < K
    assert short > 0  # the case "fewer than k items left" was exercised


@pytest.mark.parametrize("k, output_exists, model_items, message", [
    (41, False, 40, "more than the 40 items"),
    (0, False, 40, None),  # refused by the flag parser: exit code 2
    (10, True, 40, "already exists"),
    (10, False, 39, "trained on 39 items"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, k, output_exists, model_items,
                                                  message):
    import dataclasses

    from slmrec.model import build_recommender

    prepared = write_prepared(tmp_path / "prepared", random_histories(4))
    model = tiny_model()
    if model_items != model.config.num_items:
        config = dataclasses.replace(model.config, num_items=model_items)
        model = build_recommender(config, model.item_table[: model_items + 1])
    model.save(tmp_path / "model")
    if output_exists:
        (tmp_path / "scores").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        score_main(["--model", str(tmp_path / "model"), "--data", str(prepared),
                    "--output", str(tmp_path / "scores"), "--k", str(k)])
    if message is None:
        assert exit_info.value.code == 2
    else:
        assert message in str(exit_info.value.code)


def test_a_model_is_refused_on_the_same_number_of_items_in_another_order(tmp_path):
    import dataclasses

    import pyarrow as pa

    from pipelines.prepared import vocabulary_digest
    from slmrec.model import build_recommender
    from slmrec.recommend import check_vocabulary

    prepared = write_prepared(tmp_path / "prepared", random_histories(4))
    again = write_prepared(tmp_path / "again", random_histories(4))
    items = pq.read_table(again / "items")
    ids = items["item_id"].to_pylist()
    pq.write_table(items.set_column(0, "item_id", pa.array([ids[1], ids[0], *ids[2:]], pa.int64())),
                   again / "items" / "part-0.parquet")
    assert vocabulary_digest(prepared) == vocabulary_digest(tmp_path / "prepared")
    assert vocabulary_digest(again) != vocabulary_digest(prepared)

    model = tiny_model()
    recorded = build_recommender(dataclasses.replace(model.config, vocabulary=vocabulary_digest(prepared)),
                                 model.item_table)
    recorded.save(tmp_path / "model")
    check_vocabulary(tmp_path / "model", 40, vocabulary_digest(prepared))
    with pytest.raises(SystemExit, match="same count, other ids by index"):
        score_main(["--model", str(tmp_path / "model"), "--data", str(again),
                    "--output", str(tmp_path / "scores"), "--k", "3"])
    # A model saved before digests were recorded is checked on its item count alone.
    model.save(tmp_path / "old")
    check_vocabulary(tmp_path / "old", 40, vocabulary_digest(again))

def test_a_run_that_does_not_score_every_user_leaves_no_output(ray_session, tmp_path):
    # stats.json counts one user more than the sequences hold, as a lost partition would.
    prepared = write_prepared(tmp_path / "prepared", random_histories(6))
    stats = json.loads((prepared / "stats.json").read_text())
    (prepared / "stats.json").write_text(json.dumps(dict(stats, users=7)))
    tiny_model().save(tmp_path / "model")
    with pytest.raises(RuntimeError, match="scored 6 users but .* holds 7"):
        score_main(["--model", str(tmp_path / "model"), "--data", str(prepared),
                    "--output", str(tmp_path / "scores"), "--k", "3"])
    # Nothing a rerun (or jobs/pipeline.py) could take for finished scores.
    assert not (tmp_path / "scores").exists() and not list(tmp_path.glob(".scores.*"))


def test_actors_that_leave_no_cpu_for_reading_are_refused(ray_session, tmp_path):
    # The session's Ray has 2 CPUs: two 1-CPU actors would wait forever for their input.
    prepared = write_prepared(tmp_path / "prepared", random_histories(4))
    tiny_model().save(tmp_path / "model")
    with pytest.raises(SystemExit, match="--num-actors 2 x --cpus-per-actor 1 reserve 2 of the cluster's 2 CPUs"):
        score_main(["--model", str(tmp_path / "model"), "--data", str(prepared),
                    "--output", str(tmp_path / "scores"), "--k", "3", "--num-actors", "2"])

def test_int8_on_a_gpu_is_refused_by_name(tmp_path, capsys):
    # Dynamic int8 quantisation has CPU kernels only.
    with pytest.raises(SystemExit) as exit_info:
        score_main(["--model", "m", "--data", "d", "--output", str(tmp_path / "s"), "--int8",
                    "--gpus-per-actor", "0.5"])
    assert exit_info.value.code == 2
    assert "int8 models run on the CPU only" in capsys.readouterr().err
    from slmrec.recommend import Recommender

    with pytest.raises(ValueError, match="int8 models run on the CPU only, not on cuda"):
        Recommender.load(tmp_path / "never-read", int8=True, device="cuda")


def test_scoring_actors_reserve_the_gpus_asked_for():
    from pipelines.scoring import score_users

    class Sequences:
        def select_columns(self, columns):
            return self

        def map_batches(self, fn, **kwargs):
            self.kwargs = kwargs
            return self

    catalog = type("Catalog", (), {"num_items": 10})()
    sequences = Sequences()
    score_users(sequences, lambda: None, catalog, k=5, num_actors=2, num_cpus_per_actor=1.0,
                num_gpus_per_actor=0.25)
    assert sequences.kwargs["num_gpus"] == 0.25 and sequences.kwargs["num_cpus"] == 1.0
