"""A websocket policy server speaking openpi's protocol, for packed (or float) pi0 / pi0.5 policies.

Protocol (openpi's `serving/websocket_policy_server.py`, as its client package `openpi-client`
expects it; every binary frame is msgpack-numpy, `openpi_io.packb` / `unpackb`):
  1. The client connects (optionally with the header `Authorization: Api-Key KEY`; a plain
     `Api-Key: KEY` header is accepted too). A wrong or missing key where the server has one: 401.
  2. The server sends its metadata dict (`PolicyRunner.metadata`).
  3. Each binary frame from the client is one observation dict (`openpi_io.RequestAdapter`); the
     reply is the action dict {"actions": (A, d), "state", "policy_timing": {"infer_ms"},
     "server_timing": {"infer_ms", "prev_total_ms"}}.
  4. A request that cannot be served (not msgpack, wrong keys, shapes or dtypes, over the size
     limit, a text frame) is answered with a text frame holding the error message, which
     openpi-client raises as `RuntimeError("Error in inference server: ...")`. Unlike openpi's
     server, the connection stays open and the server keeps serving. An internal failure is logged
     with its traceback and answered the same way.
  5. `GET /healthz` answers 200 OK without a websocket.

Inference is serialised: one lock around every model call, so concurrent clients are answered one
request at a time, never interleaved; the event loop stays free for handshakes meanwhile (the call
runs in a worker thread). The policy is compiled (warm-up call) before the server listens.

With `record_dir`, every served observation is written as `obs_<n>.npz` (the model-level arrays:
images as received, uint8 or float; the normalised, padded state; the tokenised prompt) in the
format `calib_data.load_recordings` reads, so `duquant-jax convert --calib-from DIR` calibrates on a
robot's own observations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import http
import logging
import os
import pathlib
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

from duquant_jax.models.config import IMAGE_KEYS
from duquant_jax.openpi_io import RequestAdapter, RequestError, packb, unpackb

__all__ = ["PolicyRunner", "ServeConfig", "ServerHandle", "serve_forever", "start_in_thread"]

log = logging.getLogger("duquant_jax.serve")
_HARD_LIMIT_FACTOR = 4  # frames over this many times the limit close the connection (websockets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
  """Network settings of the server."""
  host: str = "127.0.0.1"  # 0.0.0.0 to accept clients from other machines
  port: int = 8000  # openpi's default; 0 picks a free port
  api_key: Optional[str] = None  # None: no key needed
  max_message_bytes: int = 64 << 20  # larger requests get an error reply (the connection stays);
  # frames over _HARD_LIMIT_FACTOR times this are not read at all and close the connection

  def __post_init__(self):
    if self.max_message_bytes <= 0:
      raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")
    if not 0 <= self.port < 65536:
      raise ValueError(f"port must be in 0..65535, got {self.port}")
    if self.api_key is not None and not self.api_key:
      raise ValueError("api_key must be non-empty (or None for no key)")


class PolicyRunner:
  """Requests in, replies out: adapter -> jitted `sample_actions` -> adapter. Not thread-safe:
  the server calls `handle` under one lock.

  Args:
    policy: a `duquant_jax.models.Policy` (with `runtime.PackedRuntime` for packed params).
    params: its param tree (packed or float).
    adapter: the request / reply transforms (norm stats, tokenizer) for this policy.
    num_steps: flow steps per call.
    seed: seed of the noise drawn for requests that carry none.
    record_dir: where served observations are written (None: nowhere).
    metadata: extra entries of the metadata sent on connect.
  """

  def __init__(self, policy: Any, params: Any, adapter: RequestAdapter, *, num_steps: int = 10,
               seed: int = 0, record_dir: Union[str, os.PathLike, None] = None,
               metadata: Optional[Mapping[str, Any]] = None):
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    self.policy, self.params, self.adapter, self.num_steps = policy, params, adapter, num_steps
    self._rng = np.random.default_rng(seed)
    self._sample = jax.jit(lambda params, obs, noise: policy.sample_actions(
        params, obs, jax.random.key(0), num_steps, noise=noise))
    self.record_dir = None if record_dir is None else pathlib.Path(record_dir)
    self._recorded = 0
    if self.record_dir is not None:
      self.record_dir.mkdir(parents=True, exist_ok=True)
      taken = [int(p.stem[4:]) for p in self.record_dir.glob("obs_*.npz") if p.stem[4:].isdigit()]
      self._recorded = max(taken, default=-1) + 1  # continue after an earlier run's files
    c = policy.cfg
    self.metadata = {
        "server": "duquant-jax", "model": c.name, "action_horizon": c.action_horizon,
        "action_dim": adapter.action_dims or c.action_dim, "model_action_dim": c.action_dim,
        "max_token_len": c.max_token_len, "image_keys": list(IMAGE_KEYS),
        "image_resolution": [c.vision.image_size, c.vision.image_size], "num_steps": num_steps,
        "norm_stats": sorted(adapter.norm_stats),
        "norm_mode": (("quantile" if adapter.quantile else "z-score") if adapter.norm_stats
                      else None),
        "tokenizer": adapter.tokenizer is not None, **dict(metadata or {})}

  def warmup(self) -> float:
    """Compiles the policy for one observation (batch 1) -> seconds taken."""
    c = self.policy.cfg
    size = c.vision.image_size
    request = {"image": {k: np.zeros((size, size, 3), np.uint8) for k in IMAGE_KEYS},
               "state": np.zeros((c.action_dim,), np.float32),
               "tokenized_prompt": np.zeros((c.max_token_len,), np.int32),
               "tokenized_prompt_mask": np.arange(c.max_token_len) < 1}
    t = time.perf_counter()
    self.infer(request, record=False)
    return time.perf_counter() - t

  def infer(self, request: Any, *, record: bool = True) -> dict[str, Any]:
    """One decoded request -> the reply dict (with "policy_timing").

    Raises:
      RequestError: a request the model cannot take (the message says why).
    """
    obs, context = self.adapter.to_model(request)
    noise = context["noise"]
    if noise is None:
      c = self.policy.cfg
      noise = self._rng.standard_normal((obs.batch_size, c.action_horizon, c.action_dim),
                                        np.float32)
    t = time.perf_counter()
    actions = np.asarray(self._sample(self.params, obs, noise))
    infer_ms = (time.perf_counter() - t) * 1000
    reply = self.adapter.from_model(actions, context)
    reply["policy_timing"] = {"infer_ms": infer_ms}
    if record and self.record_dir is not None:
      self._record(context["record"])
    return reply

  def _record(self, obs) -> None:
    from duquant_jax.calib_data import to_flat
    path = self.record_dir / f"obs_{self._recorded:06d}.npz"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in to_flat(obs).items()})
    os.replace(tmp, path)  # a reader never sees a partial file
    self._recorded += 1

  def handle(self, message: Union[bytes, str], prev_total_ms: Optional[float]) -> Union[bytes, str]:
    """One websocket frame -> the reply frame: packed actions, or an error message (str)."""
    start = time.perf_counter()
    try:
      if isinstance(message, str):
        raise RequestError("expected a binary msgpack-numpy frame, got a text frame")
      request = unpackb(message)
      if isinstance(request, Mapping) and "__ctrl__" in request:  # episode hooks of some clients
        return packb({"__ack__": str(request["__ctrl__"])})
      reply = self.infer(request)
    except RequestError as e:
      log.info("bad request: %s", e)
      return f"bad request: {e}"
    except Exception:  # keep serving; the traceback stays in the server's log
      log.error("inference failed:\n%s", traceback.format_exc())
      return "internal error in the duquant-jax policy server (see its log)"
    reply["server_timing"] = {"infer_ms": (time.perf_counter() - start) * 1000}
    if prev_total_ms is not None:
      reply["server_timing"]["prev_total_ms"] = prev_total_ms
    return packb(reply)


def _authorized(headers: Any, api_key: str) -> bool:
  got = headers.get("Authorization", "")
  if got.startswith("Api-Key "):
    got = got[len("Api-Key "):]
  else:
    got = headers.get("Api-Key", "")
  return hmac.compare_digest(got.encode(), api_key.encode())


class _Server:
  """The websocket side: handshake checks, metadata, the request loop; one lock for the runner."""

  def __init__(self, runner: PolicyRunner, cfg: ServeConfig):
    self.runner, self.cfg = runner, cfg
    self._lock: Optional[asyncio.Lock] = None

  def _process_request(self, connection, request):
    if request.path == "/healthz":
      return connection.respond(http.HTTPStatus.OK, "OK\n")
    if self.cfg.api_key is not None and not _authorized(request.headers, self.cfg.api_key):
      log.info("refused a connection from %s: missing or wrong API key", connection.remote_address)
      return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
    return None

  async def _handler(self, ws) -> None:
    import websockets
    log.info("connection from %s opened", ws.remote_address)
    try:
      await ws.send(packb(self.runner.metadata))
      prev_total_ms = None
      while True:
        message = await ws.recv()
        start = time.perf_counter()
        if len(message) > self.cfg.max_message_bytes:
          reply: Union[bytes, str] = (f"bad request: message of {len(message)} bytes is over the "
                                      f"server's limit of {self.cfg.max_message_bytes} bytes")
        else:
          async with self._lock:
            reply = await asyncio.to_thread(self.runner.handle, message, prev_total_ms)
        await ws.send(reply)
        prev_total_ms = (time.perf_counter() - start) * 1000
    except websockets.ConnectionClosed:
      log.info("connection from %s closed", ws.remote_address)

  async def run(self, ready: Callable[[int], None], stop: asyncio.Future) -> None:
    from websockets.asyncio.server import serve
    self._lock = asyncio.Lock()
    async with serve(self._handler, self.cfg.host, self.cfg.port, compression=None,
                     max_size=self.cfg.max_message_bytes * _HARD_LIMIT_FACTOR,
                     process_request=self._process_request) as server:
      port = server.sockets[0].getsockname()[1]
      ready(port)
      await stop


def serve_forever(runner: PolicyRunner, cfg: ServeConfig,
                  ready: Optional[Callable[[int], None]] = None, *, warmup: bool = True) -> None:
  """Warms the runner up (unless done already), then serves until interrupted; `ready(port)` is
  called once the server listens."""
  if warmup:
    runner.warmup()

  async def main():
    stop = asyncio.get_running_loop().create_future()  # never set: runs until interrupted
    await _Server(runner, cfg).run(ready or (lambda port: None), stop)

  asyncio.run(main())


@dataclasses.dataclass
class ServerHandle:
  """A server running in a background thread (`start_in_thread`)."""
  port: int
  thread: threading.Thread
  _loop: asyncio.AbstractEventLoop
  _stop: asyncio.Future

  def close(self, timeout: float = 10.0) -> None:
    """Stops the server and waits for its thread."""
    self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
    self.thread.join(timeout)


def start_in_thread(runner: PolicyRunner, cfg: ServeConfig, *, warmup: bool = True,
                    timeout: float = 60.0) -> ServerHandle:
  """Starts the server in a daemon thread (after the warm-up) and returns once it listens."""
  if warmup:
    runner.warmup()
  started = threading.Event()
  box: dict[str, Any] = {}

  def target():
    loop = asyncio.new_event_loop()
    box["loop"] = loop
    box["stop"] = loop.create_future()

    def ready(port):
      box["port"] = port
      started.set()

    try:
      loop.run_until_complete(_Server(runner, cfg).run(ready, box["stop"]))
    except BaseException as e:  # surfaced to the caller below
      box["error"] = e
      started.set()
    finally:
      loop.close()

  thread = threading.Thread(target=target, name="duquant-serve", daemon=True)
  thread.start()
  if not started.wait(timeout):
    raise TimeoutError(f"server did not start within {timeout} s")
  if "error" in box:
    raise box["error"]
  return ServerHandle(port=box["port"], thread=thread, _loop=box["loop"], _stop=box["stop"])
