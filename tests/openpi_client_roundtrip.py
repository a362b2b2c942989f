"""Client side of the serve tests: runs openpi's own client package against a duquant-jax server.

Run with the python of a virtual environment holding `openpi-client` (it pins numpy < 2, so it has
its own; `.ci/run` makes `.venv-client` and exports DUQUANT_CLIENT_PYTHON). Not a test module: the
tests in test_serve.py run it as a subprocess and check what it writes.

    python openpi_client_roundtrip.py --port P --requests IN.npz --out OUT.json
        [--api-key K] [--scenarios roundtrip,bad,concurrent,auth] [--max-message-mb M]

IN.npz holds observations as flat keys "<i>/image/<camera>", "<i>/state", "<i>/prompt", ... (an
observation per index i). OUT.json: {"metadata": ..., "<scenario>": ...} with actions as lists.
"""

import argparse
import json
import threading
import traceback

import numpy as np
from openpi_client import image_tools
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy


def load_requests(path):
  """IN.npz -> [observation dict] in openpi's nested form (prompt as a str)."""
  out = {}
  with np.load(path, allow_pickle=False) as data:
    for key in data.files:
      index, *rest = key.split("/")
      node = out.setdefault(int(index), {})
      for part in rest[:-1]:
        node = node.setdefault(part, {})
      value = data[key]
      node[rest[-1]] = str(value) if value.dtype.kind == "U" else value
  return [out[i] for i in sorted(out)]


def infer_or_error(client, obs):
  try:
    result = client.infer(obs)
  except RuntimeError as e:  # openpi-client raises this for a text (error) frame
    return {"error": str(e)}
  return {"actions": np.asarray(result["actions"]).tolist(),
          "state": np.asarray(result["state"]).tolist(),
          "server_timing": result["server_timing"], "policy_timing": result["policy_timing"]}


def raw_exchange(client, payload):
  """Sends raw bytes (or text) on the client's websocket; -> the reply, decoded or as the error."""
  client._ws.send(payload)
  reply = client._ws.recv()
  if isinstance(reply, str):
    return {"error": reply}
  return {"reply": str(msgpack_numpy.unpackb(reply))[:200]}


def scenario_roundtrip(args, requests):
  client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", args.port, api_key=args.api_key)
  return {"metadata": client.get_server_metadata(),
          "results": [infer_or_error(client, obs) for obs in requests]}


def scenario_bad(args, requests):
  client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", args.port, api_key=args.api_key)
  good = requests[0]
  wrong_state = dict(good, state=np.zeros((good["state"].shape[0] + 100,), np.float32))
  wrong_image = dict(good, image=dict(good["image"], base_0_rgb=np.zeros((7, 9, 3), np.float32)))
  no_prompt = {k: v for k, v in good.items() if k not in ("prompt", "tokenized_prompt",
                                                          "tokenized_prompt_mask")}
  big = int(args.max_message_mb * (1 << 20)) + 1024
  out = {
      "garbage": raw_exchange(client, b"\xc1\x00not msgpack at all"),
      "truncated": raw_exchange(client, msgpack_numpy.packb(good)[:-10]),
      "text": raw_exchange(client, "hello"),
      "not_a_dict": raw_exchange(client, msgpack_numpy.packb([1, 2, 3])),
      "wrong_state": infer_or_error(client, wrong_state),
      "wrong_image": infer_or_error(client, wrong_image),
      "no_prompt": infer_or_error(client, no_prompt),
      "oversized": infer_or_error(client, dict(good, padding=np.zeros((big,), np.uint8))),
  }
  out["good_after"] = infer_or_error(client, good)
  return out


def scenario_concurrent(args, requests):
  results = [None, None]

  def worker(slot):
    try:
      client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", args.port,
                                                              api_key=args.api_key)
      results[slot] = [infer_or_error(client, requests[slot % len(requests)]) for _ in range(3)]
    except Exception:
      results[slot] = [{"error": traceback.format_exc()}]

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  return results


def scenario_auth(args, requests):
  out = {}
  for name, key in (("wrong_key", "not-the-key"), ("no_key", None)):
    try:
      websocket_client_policy.WebsocketClientPolicy("127.0.0.1", args.port, api_key=key)
      out[name] = "connected"
    except Exception as e:
      out[name] = f"{type(e).__name__}: {e}"
  return out


def scenario_resize(args, requests):
  """Raw camera frames (another size, uint8) vs the same frames resized here by openpi-client's
  own resize_with_pad, as openpi's example clients do: the server must give the same actions."""
  client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", args.port, api_key=args.api_key)
  good = requests[0]
  size = good["image"]["base_0_rgb"].shape[0]
  rng = np.random.default_rng(7)
  raw = {k: rng.integers(0, 256, (size + 21, size - 9, 3), dtype=np.uint8) for k in good["image"]}
  resized = {k: image_tools.resize_with_pad(v, size, size) for k, v in raw.items()}
  return {"raw": infer_or_error(client, dict(good, image=raw)),
          "resized": infer_or_error(client, dict(good, image=resized))}


SCENARIOS = {"resize": scenario_resize, "roundtrip": scenario_roundtrip, "bad": scenario_bad,
             "concurrent": scenario_concurrent, "auth": scenario_auth}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--requests", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--api-key", default=None)
  parser.add_argument("--scenarios", default="roundtrip")
  parser.add_argument("--max-message-mb", type=float, default=1.0)
  args = parser.parse_args()
  requests = load_requests(args.requests)
  out = {name: SCENARIOS[name](args, requests) for name in args.scenarios.split(",")}
  with open(args.out, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
