#!/usr/bin/env python3
"""Record a vLLM's KV-cache events (ZeroMQ PUB) while sending token-id prompts.

    record_kv_events.py OUT.bin [--endpoint tcp://127.0.0.1:5557] [--topic kv]
                        [--url http://127.0.0.1:8000]

Run it with the vLLM venv's python (pyzmq is there), against a vLLM started
with `SLUICE_VLLM_KV_EVENTS=1 just vllm`. It sends the prompts of PROMPTS
(which share a 64-token prefix) as `/v1/completions` requests, one at a time,
and writes every multipart message received until the events go quiet. With
`--evict N`, N more prompts follow (for an engine started with a small
cache, e.g. `SLUICE_VLLM_ARGS="--num-gpu-blocks-override 64 --max-model-len 1024"`,
so that it evicts); with `--reset`, the prefix cache is reset at the end.

OUT.bin: each message is a u32 big-endian frame count, then each frame as a
u32 big-endian length and its bytes. vLLM's messages have three frames:
topic, an 8-byte big-endian sequence number, the msgpack EventBatch.
The prompts sent are written beside it as OUT.prompts.json.
"""
import argparse, json, struct, time, urllib.request
import zmq

SHARED = [100 + i for i in range(64)]
PROMPTS = [SHARED + [1000 + 7 * j + i for i in range(40)] for j in range(4)]


def complete(url, prompt):
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": 1,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5557")
    ap.add_argument("--topic", default="kv")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--evict", type=int, default=0, metavar="N",
                    help="then send N more 200-token prompts, to make a small cache evict")
    ap.add_argument("--reset", action="store_true",
                    help="then POST /reset_prefix_cache (needs VLLM_SERVER_DEV_MODE=1)")
    a = ap.parse_args()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(a.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, a.topic.encode())
    time.sleep(1.0)  # let the subscription reach the publisher
    messages = []

    def drain(quiet):
        deadline = time.time() + quiet
        while time.time() < deadline:
            if sub.poll(100):
                messages.append(sub.recv_multipart())
                deadline = time.time() + quiet

    for p in PROMPTS:
        complete(a.url, p)
        drain(0.5)
    extra = [[2000 + (97 * n + 31 * i) % 2000 for i in range(200)] for n in range(a.evict)]
    for p in extra:
        complete(a.url, p)
        drain(0.3)
    if a.reset:
        req = urllib.request.Request(a.url + "/reset_prefix_cache", b"", method="POST")
        urllib.request.urlopen(req, timeout=30).read()
        # The engine publishes its queued events on its next step.
        complete(a.url, [7, 8, 9])
    drain(2.0)
    with open(a.out, "wb") as f:
        for frames in messages:
            f.write(struct.pack(">I", len(frames)))
            for fr in frames:
                f.write(struct.pack(">I", len(fr)) + fr)
    with open(a.out.removesuffix(".bin") + ".prompts.json", "w") as f:
        json.dump(PROMPTS + extra, f)
    print(f"recorded {len(messages)} messages to {a.out}")


if __name__ == "__main__":
    main()
