"""The Serve endpoint over real HTTP on 127.0.0.1: answers equal the in-process model,
several students are multiplexed, users are batched, and every kind of bad input gets
the documented fallback or a 4xx naming the field, never a 500."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from jobs.serve import MODEL_HEADER, build_app
from slmrec.recommend import Recommender
from tests.tiny_serving import NUM_ITEMS, item_id, random_histories, tiny_model, write_prepared

MAX_BATCH = 4
LIMITS = {"max_batch_size": MAX_BATCH, "batch_wait_timeout_s": 0.05, "max_requests": 8,
          "max_history": 20, "max_k": NUM_ITEMS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    histories = random_histories(10, seed=21)
    prepared = write_prepared(root / "prepared", histories)
    models = {"a": tiny_model(seed=1), "b": tiny_model(seed=2)}
    for name, model in models.items():
        model.save(root / name)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": [f"a={root / 'a'}", f"b={root / 'b'}"],
                         "data": str(prepared), **LIMITS}),
              name="slmrec-test", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield SimpleNamespace(client=client, histories=histories, models=models)
    finally:
        client.close()
        serve.shutdown()


def expected(model, history: list[int], k: int, exclude_seen: bool = True) -> list[int]:
    _, indices = Recommender(model)([history], k, exclude_seen)
    return [item_id(i) for i in indices[0].tolist() if i >= 1]


def post(server, body, **kwargs) -> httpx.Response:
    response = server.client.post("/recommend", json=body, **kwargs)
    assert response.status_code < 500, response.text
    return response


def test_health_models_and_docs(server):
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["users"] == 10 and health["items"] == NUM_ITEMS
    models = server.client.get("/models").json()
    assert models["default"] == "a" and [m["id"] for m in models["models"]] == ["a", "b"]
    assert "/recommend" in server.client.get("/openapi.json").json()["paths"]
    assert server.client.get("/docs").status_code == 200


def test_known_users_and_histories_match_the_in_process_model(server):
    body = {"requests": [{"user_id": "u3"}, {"user_id": "u7"},
                         {"history": [item_id(i) for i in [5, 9, 2]]}], "k": 7}
    results = post(server, body).json()["results"]
    model = server.models["a"]
    assert results[0]["items"] == expected(model, server.histories[3], 7)
    assert results[1]["items"] == expected(model, server.histories[7], 7)
    assert results[2]["items"] == expected(model, [5, 9, 2], 7)
    assert all(r["fallback"] is None and r["unknown_items"] == [] for r in results)
    assert not set(results[0]["items"]) & {item_id(i) for i in server.histories[3]}
    # String and integer spellings of an item id are the same item.
    as_strings = post(server, {"requests": [{"history": [str(item_id(i)) for i in [5, 9, 2]]}],
                               "k": 7}).json()["results"][0]["items"]
    assert as_strings == results[2]["items"]


def test_exclude_seen_false_may_return_history_items(server):
    history = server.histories[0]
    body = {"requests": [{"user_id": "u0"}], "k": NUM_ITEMS, "exclude_seen": False}
    items = post(server, body).json()["results"][0]["items"]
    assert items == expected(server.models["a"], history, NUM_ITEMS, exclude_seen=False)
    assert set(items) & {item_id(i) for i in history}


def test_model_is_chosen_per_call_by_body_or_header(server):
    body = {"requests": [{"user_id": "u1"}], "k": 10}
    by_body = post(server, {**body, "model": "b"}).json()
    by_header = post(server, body, headers={MODEL_HEADER: "b"}).json()
    default = post(server, body).json()
    want_b = expected(server.models["b"], server.histories[1], 10)
    assert by_body["model"] == by_header["model"] == "b"
    assert by_body["results"][0]["items"] == by_header["results"][0]["items"] == want_b
    assert default["model"] == "a" and default["results"][0]["items"] != want_b


def test_users_of_one_call_are_batched(server):
    before = server.client.get("/healthz").json()
    post(server, {"requests": [{"user_id": f"u{i}"} for i in range(8)], "k": 3})
    after = server.client.get("/healthz").json()
    assert after["batched_users"] - before["batched_users"] == 8
    # 8 users, at most MAX_BATCH per forward: 2 forwards if batching works, 8 if not.
    assert after["batches"] - before["batches"] == 8 // MAX_BATCH


def _popular(server, k: int) -> list[int]:
    counts = np.bincount(np.concatenate(server.histories), minlength=NUM_ITEMS + 1)
    counts[0] = -1
    order = sorted(range(1, NUM_ITEMS + 1), key=lambda i: (-counts[i], i))
    return [item_id(i) for i in order[:k]]


@pytest.mark.parametrize("request_, reason, unknown", [
    ({"user_id": "nobody"}, "unknown_user", []),
    ({"user_id": 12345}, "unknown_user", []),
    ({"history": []}, "empty_history", []),
    ({"history": [3, "x"]}, "no_known_items", [3, "x"]),
])
def test_popularity_fallback_is_flagged(server, request_, reason, unknown):
    result = post(server, {"requests": [request_], "k": 5}).json()["results"][0]
    assert result["fallback"] == "popularity" and result["reason"] == reason
    assert result["items"] == _popular(server, 5)
    assert result["unknown_items"] == unknown


def test_unknown_items_are_dropped_and_reported(server):
    history = [item_id(4), 999999, item_id(8), "nope"]
    result = post(server, {"requests": [{"history": history}], "k": 6}).json()["results"][0]
    assert result["fallback"] is None
    assert result["unknown_items"] == [999999, "nope"]
    assert result["items"] == expected(server.models["a"], [4, 8], 6)


def _error_locs(response: httpx.Response) -> list[list]:
    return [d["loc"] for d in response.json()["detail"]]


@pytest.mark.parametrize("body, status, loc", [
    ({"requests": [{"user_id": "u1"}], "k": 0}, 422, ["body", "k"]),
    ({"requests": [{"user_id": "u1"}], "k": NUM_ITEMS + 1}, 422, ["body", "k"]),
    ({"requests": [{"user_id": "u1"}], "k": "ten"}, 422, ["body", "k"]),
    ({"requests": [{"user_id": "u1"}] * 9}, 413, ["body", "requests"]),
    ({"requests": []}, 422, ["body", "requests"]),
    ({"k": 3}, 422, ["body", "requests"]),
    ({"requests": [{"history": [item_id(1)] * 21}]}, 422, ["body", "requests", 0, "history"]),
    ({"requests": [{"user_id": "u1", "history": [1]}]}, 422, ["body", "requests", 0]),
    ({"requests": [{}]}, 422, ["body", "requests", 0]),
    ({"requests": [{"user": "u1"}]}, 422, ["body", "requests", 0, "user"]),
    ({"requests": [{"user_id": 1.5}]}, 422, ["body", "requests", 0, "user_id"]),
    ({"requests": [{"user_id": "u1"}], "model": "zzz"}, 404, ["body", "model"]),
    ({"requests": [{"user_id": "u1"}], "exclude_seen": "maybe"}, 422, ["body", "exclude_seen"]),
])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, loc):
    response = post(server, body)
    assert response.status_code == status, response.text
    assert any(got[: len(loc)] == loc for got in _error_locs(response)), response.text


def test_malformed_json_is_a_422(server):
    response = server.client.post("/recommend", content=b'{"requests": [',
                                  headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert _error_locs(response)[0][0] == "body"


def test_unknown_model_in_header_is_a_404(server):
    response = post(server, {"requests": [{"user_id": "u1"}]}, headers={MODEL_HEADER: "zzz"})
    assert response.status_code == 404 and "zzz" in response.text
    assert _error_locs(response) == [["header", MODEL_HEADER]]
    # An empty id names no model: 404, not a silent fall-back to the default.
    response = post(server, {"requests": [{"user_id": "u1"}], "model": ""})
    assert response.status_code == 404 and _error_locs(response) == [["body", "model"]]


def test_serve_config_file_deploys_this_app():
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import ServeConfig

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster/serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is build_app
    ServeConfig(**app["args"])  # every key is a known setting with a valid value


def test_unknown_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="max_batch"):
        build_app({"model": ["m"], "data": "d", "max_batch": 3})


def test_replicas_reserve_the_gpus_asked_for_and_int8_stays_on_cpus():
    app = build_app({"model": ["m"], "data": "d", "gpus_per_replica": 0.5, "cpus_per_replica": 2})
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="int8 models run on the CPU only"):
        build_app({"model": ["m"], "data": "d", "gpus_per_replica": 1, "quantize": "both"})


def test_repeated_model_flags_are_all_kept():
    from jobs.serve import ServeConfig, model_specs
    from slmrec.config import parse_config

    argv = ["--model", "a=/x", "--data", "d", "--model", "/y/b", "--quantize", "both"]
    specs = model_specs(parse_config(ServeConfig, "", argv))
    assert specs == {"a": ("/x", False), "a-int8": ("/x", True),
                     "b": ("/y/b", False), "b-int8": ("/y/b", True)}
    # A Serve config file may give one model as a scalar (was: read letter by letter).
    assert model_specs(ServeConfig(model="a=/x", data="d")) == {"a": ("/x", False)}


def test_a_training_jobs_output_directory_serves_its_best_model(tmp_path):
    from jobs.serve import ServeConfig, model_specs

    tiny_model().save(tmp_path / "distill" / "best")
    assert model_specs(ServeConfig(model=[str(tmp_path / "distill")], data="d")) == {
        "distill": (str(tmp_path / "distill" / "best"), False)}
    assert model_specs(ServeConfig(model=[f"s={tmp_path / 'distill' / 'best'}"], data="d")) == {
        "s": (str(tmp_path / "distill" / "best"), False)}


@pytest.mark.parametrize("spec,expected", [
    ("a=/x", ("a", "/x")),
    ("/y/b", ("b", "/y/b")),
    # A run folder with '=' in its name is a path, not NAME=PATH.
    ("/runs/lr=1e-3/best", ("best", "/runs/lr=1e-3/best")),
    ("s=/runs/lr=1e-3/best", ("s", "/runs/lr=1e-3/best")),
    ("a=", ("a", "")),
])
def test_model_spec_is_name_equals_path_only_when_the_name_is_bare(spec, expected):
    from jobs.common.model_spec import split_model_spec

    assert split_model_spec(spec) == expected


def test_an_existing_path_with_an_equals_sign_is_taken_whole(tmp_path, monkeypatch):
    from jobs.common.model_spec import split_model_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=1e-3").mkdir()
    assert split_model_spec("lr=1e-3") == ("lr=1e-3", "lr=1e-3")
    assert split_model_spec("lr=2e-3") == ("lr", "2e-3")


def test_cli_refuses_a_missing_model_or_a_vocabulary_mismatch_before_starting(tmp_path):
    from jobs.serve import main

    prepared = write_prepared(tmp_path / "prepared", random_histories(4))
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--model", str(tmp_path / "nowhere"), "--data", str(prepared)])
    other = write_prepared(tmp_path / "other", [[1, 2, 3]])
    (other / "stats.json").write_text('{"items": 39}')
    tiny_model().save(tmp_path / "m")
    with pytest.raises(SystemExit, match="trained on 40 items"):
        main(["--model", str(tmp_path / "m"), "--data", str(other)])


def test_user_histories_of_a_sliced_list_array():
    import pyarrow as pa

    from pipelines.catalog import UserHistories

    whole = pa.array([[1, 2], [3], [4, 5, 6], [7]], pa.list_(pa.int64()))
    histories = UserHistories(["b", "c"], whole.slice(1, 2))
    assert histories.get("b").tolist() == [3] and histories.get("c").tolist() == [4, 5, 6]
    assert histories.get("a") is None
