r"""Online serving: a Ray Serve HTTP endpoint that recommends items for a batch of users.

Local (starts a bounded Ray instance, serves on 127.0.0.1:8000 until Ctrl-C):
    python jobs/serve.py --model out/distill --data out/ml-1m
Several students in one deployment (model multiplexing; the first is the default):
    python jobs/serve.py --model a=out/student-2l --model b=out/student-4l --data out/ml-1m
A Tune sweep's winner: python jobs/serve.py --config out/tune/serve.yaml
--model takes a model directory or the output directory of the job that trained it (its best/).
On a cluster: `serve deploy cluster/serve_config.yaml` (see that file).

API (OpenAPI docs at /docs, schema at /openapi.json):
  POST /recommend  {"requests": [{"user_id": "u1"}, {"history": [1193, 661]}],
                    "k": 10, "exclude_seen": true, "model": "b"}
      -> {"model": "b", "results": [{"items": [...original item ids...],
                                     "scores": [...], "fallback": null, ...}, ...]}
      one result per request, in order. A request names a known user (its history is
      the user's whole kept sequence in the prepared data) or gives a history of
      ORIGINAL item ids, oldest first. The model is `model` in the body, else the
      `serve_multiplexed_model_id` header, else the default.
  GET /healthz, GET /models.

Behaviour on bad input (never a 500):
  - unknown user, empty history, or a history with no known item: the POPULARITY
    fallback: the k items with the most interactions in the prepared data, scored by
    that count; the result says `"fallback": "popularity"` and `"reason"`.
  - unknown item ids in a history are dropped and listed in `"unknown_items"`; the
    model ranks the rest.
  - k out of 1..min(max_k, items), more than max_requests requests (413), a history
    longer than max_history, malformed JSON, wrong types, both or neither of user_id
    and history: 4xx whose `detail[].loc` names the field. Unknown model: 404.
A user gets fewer than k items only when exclude_seen leaves fewer than k items.

The users of all concurrent calls are pooled into model forwards of up to
--max-batch-size users (@serve.batch, waiting at most --batch-wait-timeout-s for a batch
to fill). A model is loaded by the first call that asks for it (multiplexing keeps up to
MAX_MODELS_PER_REPLICA per replica), so that first call is slower.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from ray import serve

from jobs.common.job_paths import refuse_relative_paths_if_submitted
from jobs.common.model_spec import resolve_model_dir, split_model_spec
from pipelines.catalog import ItemCatalog, UserHistories
from pipelines.prepared import num_items, vocabulary_digest
from slmrec.config import field, parse_config
from slmrec.recommend import Recommender, check_vocabulary

MAX_MODELS_PER_REPLICA = 4
"""Students kept loaded per replica (least recently used ones are evicted)."""
INT8_SUFFIX = "-int8"
MODEL_HEADER = "serve_multiplexed_model_id"


@dataclass
class ServeConfig:
    model: list[str] = field(help="model as PATH or NAME=PATH, PATH a model directory or the output "
                             "directory of the job that trained it (its best/); repeat for several "
                             "students (the first is the default; NAME defaults to the directory name)")
    data: str = field(help="prepared data directory: item vocabulary, popularity, user histories")
    quantize: Literal["none", "int8", "both"] = field(
        "none", help="serve int8 (dynamically quantised) models: 'int8' replaces each model, "
        f"'both' adds NAME{INT8_SUFFIX} next to NAME")
    host: str = field("127.0.0.1", help="HTTP host (0.0.0.0 to accept remote clients)")
    port: int = field(8000, help="HTTP port")
    max_batch_size: int = field(64, help="most users in one model forward (@serve.batch)")
    batch_wait_timeout_s: float = field(0.005, help="longest wait for a batch to fill")
    max_ongoing_requests: int = field(64, help="HTTP calls in flight per replica (raised to "
                                      "max_batch_size if lower, or batches could never fill)")
    max_requests: int = field(256, help="most requests (users) in one POST /recommend")
    max_history: int = field(1000, help="longest history (items) accepted in a request")
    max_k: int = field(1000, help="largest k accepted (also capped at the number of items)")
    num_replicas: int = field(1, help="Serve replicas")
    cpus_per_replica: float = field(1.0, help="CPUs per replica; torch uses as many threads")
    gpus_per_replica: float = field(0.0, help="GPUs per replica; above 0 the models run on CUDA (fractions "
                                              "share a GPU between replicas; not with --quantize)")
    chunk_size: int = field(65536, help="items scored at a time in the top-k")
    num_cpus: int = field(2, help="CPUs of the local Ray instance (ignored on a cluster)")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_requests", "max_history", "max_k", "num_replicas",
                     "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if self.gpus_per_replica > 0 and self.quantize != "none":
            raise ValueError("int8 models run on the CPU only; drop --quantize or --gpus-per-replica")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if not self.model:
            raise ValueError("give at least one --model")


def model_specs(config: ServeConfig) -> dict[str, tuple[str, bool]]:
    """Model id -> (checkpoint path, int8), in the order given (first = default)."""
    specs: dict[str, tuple[str, bool]] = {}
    # A Serve config file's `model: NAME=PATH` (a scalar, not a list) is one model.
    for spec in [config.model] if isinstance(config.model, str) else config.model:
        name, path = split_model_spec(spec)
        if not name or not path:
            raise ValueError(f"--model {spec!r}: expected PATH or NAME=PATH")
        variants = {"none": [(name, False)], "int8": [(name, True)],
                    "both": [(name, False), (name + INT8_SUFFIX, True)]}[config.quantize]
        for model_id, int8 in variants:
            if model_id in specs:
                raise ValueError(f"model id {model_id!r} is given twice; name them NAME=PATH")
            specs[model_id] = (str(resolve_model_dir(path)), int8)
    return specs


# ---- HTTP schema --------------------------------------------------------------------------

ItemId = Union[StrictInt, StrictStr]


class UserRequest(BaseModel):
    """One user: exactly one of `user_id` (a user of the prepared data) or `history`
    (original item ids, oldest first)."""
    model_config = ConfigDict(extra="forbid")
    user_id: Optional[ItemId] = Field(None, description="a user id of the prepared data")
    history: Optional[list[ItemId]] = Field(None, description="original item ids, oldest first")

    @model_validator(mode="after")
    def _exactly_one(self) -> "UserRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[UserRequest] = Field(..., min_length=1, description="users to recommend for")
    k: StrictInt = Field(10, description="items per user (1..min(max_k, number of items))")
    exclude_seen: bool = Field(True, description="never recommend items of the history (a known user's: the "
                                                   "kept sequence, as prepare truncated it)")
    model: Optional[StrictStr] = Field(None, description="model id (GET /models); default: "
                                       f"the `{MODEL_HEADER}` header, else the first model")


class Recommendation(BaseModel):
    user_id: Optional[ItemId] = None
    items: list[ItemId] = Field(description="original item ids, best first")
    scores: list[float] = Field(description="model scores, or interaction counts for the fallback")
    fallback: Optional[Literal["popularity"]] = Field(
        None, description="set when the model could not be used for this user")
    reason: Optional[Literal["unknown_user", "empty_history", "no_known_items"]] = None
    unknown_items: list[ItemId] = Field(default_factory=list,
                                        description="history items not in the vocabulary (dropped)")


class RecommendResponse(BaseModel):
    model: str
    results: list[Recommendation]


def field_error(status: int, loc: list[Any], message: str) -> HTTPException:
    """An error shaped like FastAPI's own validation errors: detail[].loc names the field."""
    return HTTPException(status, detail=[{"loc": loc, "msg": message, "type": "value_error"}])


# ---- the deployment ----------------------------------------------------------------------

api = FastAPI(title="SLMRec recommender", version="1", description=(
    "Top-k next-item recommendations from a distilled SLMRec student. POST /recommend takes "
    "a batch of users (known user ids or histories of original item ids) and returns "
    "original item ids with scores. Unknown users and empty histories get the popularity "
    "fallback (flagged); unknown items in a history are dropped and listed."))


@dataclass
class _Job:
    recommender: Recommender
    history: list[int]
    k: int
    exclude_seen: bool


@serve.deployment
@serve.ingress(api)
class RecommenderService:
    def __init__(self, config: dict[str, Any]):
        self.config = ServeConfig(**config)
        self.specs = model_specs(self.config)
        self.default_model = next(iter(self.specs))
        self.catalog = ItemCatalog.from_prepared(self.config.data)
        vocabulary = vocabulary_digest(self.config.data)
        for path, _ in self.specs.values():
            check_vocabulary(path, self.catalog.num_items, vocabulary)
        self.histories = UserHistories.from_prepared(self.config.data)
        self.max_k = min(self.config.max_k, self.catalog.num_items)
        self.stats = {"batches": 0, "batched_users": 0}
        torch.set_num_threads(max(1, int(self.config.cpus_per_replica)))
        self.run_batch.set_max_batch_size(self.config.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> Recommender:
        path, int8 = self.specs[model_id]
        device = "cuda" if self.config.gpus_per_replica > 0 else "cpu"
        return await asyncio.to_thread(Recommender.load, path, int8, self.config.chunk_size, device)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def run_batch(self, jobs: list[_Job]) -> list[tuple[list[float], list[int]]]:
        """One forward per (model, exclude_seen) group of the users waiting right now."""
        self.stats["batches"] += 1
        self.stats["batched_users"] += len(jobs)
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.recommender), job.exclude_seen), []).append(i)
        for (_, exclude), rows in groups.items():
            recommender = jobs[rows[0]].recommender
            k = max(jobs[i].k for i in rows)
            scores, indices = await asyncio.to_thread(
                recommender, [jobs[i].history for i in rows], k, exclude)
            for row, i in enumerate(rows):
                keep = indices[row, : jobs[i].k] >= 1
                results[i] = (scores[row, : jobs[i].k][keep].tolist(),
                              indices[row, : jobs[i].k][keep].tolist())
        return results

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "users": len(self.histories), "items": self.catalog.num_items,
                "models": list(self.specs), **self.stats}

    @api.get("/models")
    async def models(self) -> dict[str, Any]:
        return {"default": self.default_model,
                "models": [{"id": m, "path": p, "int8": q} for m, (p, q) in self.specs.items()]}

    @api.post("/recommend", response_model=RecommendResponse,
              responses={404: {"description": "unknown model"},
                         413: {"description": "too many requests in one call"},
                         422: {"description": "invalid field (detail[].loc names it)"}})
    async def recommend(self, body: RecommendBody, request: Request) -> RecommendResponse:
        self._validate(body)
        model_id, loc = body.model, ["body", "model"]
        if model_id is None:
            model_id, loc = request.headers.get(MODEL_HEADER), ["header", MODEL_HEADER]
        if model_id is None:
            model_id = self.default_model
        if model_id not in self.specs:
            raise field_error(404, loc, f"unknown model {model_id!r}; available: {list(self.specs)}")
        recommender = await self.get_model(model_id)
        results = await asyncio.gather(*(self._one(r, body, recommender) for r in body.requests))
        return RecommendResponse(model=model_id, results=list(results))

    def _validate(self, body: RecommendBody) -> None:
        if len(body.requests) > self.config.max_requests:
            raise field_error(413, ["body", "requests"],
                              f"{len(body.requests)} requests in one call; at most "
                              f"{self.config.max_requests}")
        if not 1 <= body.k <= self.max_k:
            raise field_error(422, ["body", "k"], f"k must be in 1..{self.max_k}, got {body.k}")
        for i, r in enumerate(body.requests):
            if r.history is not None and len(r.history) > self.config.max_history:
                raise field_error(422, ["body", "requests", i, "history"],
                                  f"history of {len(r.history)} items; at most "
                                  f"{self.config.max_history}")

    async def _one(self, r: UserRequest, body: RecommendBody,
                   recommender: Recommender) -> Recommendation:
        unknown: list[Any] = []
        if r.user_id is not None:
            history = self.histories.get(r.user_id)
            reason = "unknown_user" if history is None else None
            history = [] if history is None else history.tolist()
        else:
            history, unknown = self.catalog.index_of(r.history)
            reason = None if history else ("empty_history" if not r.history else "no_known_items")
        if reason is not None:
            indices, counts = self.catalog.most_popular(body.k)
            scores = counts.astype(float).tolist()
            fallback = "popularity"
        else:
            scores, indices = await self.run_batch(_Job(recommender, history, body.k,
                                                        body.exclude_seen))
            fallback = None
        return Recommendation(user_id=r.user_id, items=self.catalog.ids_of(indices).to_pylist(),
                              scores=scores, fallback=fallback, reason=reason,
                              unknown_items=unknown)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (ServeConfig fields); also the `import_path`
    target of cluster/serve_config.yaml (`serve deploy` passes the file's `args`)."""
    try:
        config = ServeConfig(**args)
        model_specs(config)
    except TypeError as e:
        raise ValueError(f"serve args: {e}; known: {[f.name for f in dataclasses.fields(ServeConfig)]}") from e
    return RecommenderService.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
    ).bind(dataclasses.asdict(config))


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ServeConfig, __doc__, argv)
    refuse_relative_paths_if_submitted(config, "serve")
    # Every check that needs no Ray runs first, so a typo fails in a second, not after
    # Ray and Serve have started.
    try:
        specs = model_specs(config)
        items, vocabulary = num_items(config.data), vocabulary_digest(config.data)
        for path, _ in specs.values():
            check_vocabulary(path, items, vocabulary)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"serve: {e}")

    from jobs.common.ray_runtime import check_gpus, init_local_ray

    init_local_ray(num_cpus=config.num_cpus)
    if config.gpus_per_replica > 0:
        try:
            check_gpus(config.gpus_per_replica, f"--gpus-per-replica {config.gpus_per_replica:g}")
        except ValueError as e:
            sys.exit(f"serve: {e}")
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(dataclasses.asdict(config)), name="slmrec", route_prefix="/")
    print(f"serving {list(specs)} on http://{config.host}:{config.port} (docs: /docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
