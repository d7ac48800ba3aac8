#!/usr/bin/env bash
# Issue 14's measurements on a GPU machine that has CUDA torch but not flwr, Ray or Opacus,
# in one call of at most 530 s plus the unpacking (the default parts' limits summed). Each
# part has its own time limit and writes its output to $OUT/NN-part.txt as it goes, so a
# part that runs out of time loses only itself.
#
# Prepare, in the checkout (../shared/gpu-site/README.md; .gpu/ is ignored by git):
#   mkdir -p .gpu/data && cp ../shared/gpu-site/site-py312.tar.xz .gpu/ \
#     && cp -r ../shared/data/mnist .gpu/data/ && echo /.gpu/ >> .git/info/exclude
# Then, on the GPU machine, from the checkout's root (the device tool: carry [".gpu"]):
#   bash experiments/research/gpu_check.sh [parts, e.g. "lstm rounds"]
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu-out}
PARTS=${1:-"lstm rounds cohort noise graphs"}
mkdir -p "$OUT" /tmp/site
if [ ! -d /tmp/site/opacus ]; then
    xz -dc .gpu/site-py312.tar.xz | tar -x -C /tmp/site || exit 1
    python3 -m compileall -q /tmp/site >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$ROOT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/00-gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())" \
    >>"$OUT/00-gpu.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it if NAME was asked for
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    N=$((N + 1))
    local file
    file="$OUT/$(printf '%02d' "$N")-$name.txt"
    echo "\$ $*" >"$file"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$file" 2>&1
    echo "[exit $? after $((SECONDS - start)) s]" >>"$file"
}
N=0
M=experiments.research
# FastDPLSTM on CUDA: the default (cuDNN) against the loop, the same function and gradients
part lstm 60 python3 -c '
import torch
from fedsim.dp import FastDPLSTM
for dtype in (torch.float64, torch.float32):
    torch.manual_seed(0)
    loop = FastDPLSTM(8, 256, 2, batch_first=True, fused=False)
    default = FastDPLSTM(8, 256, 2, batch_first=True)
    default.load_state_dict(loop.state_dict())
    x = torch.randn(64, 80, 8, dtype=dtype, device="cuda")
    got = []
    for m in (loop.to("cuda", dtype), default.to("cuda", dtype)):
        out, (h, c) = m(x)
        (out.square().sum() + h.sum()).backward()
        got.append([out, h, c, *(p.grad for p in m.parameters())])
    rel = max(((b - a).norm() / a.norm()).item() for a, b in zip(*got))
    print(dtype, "largest relative difference, cuDNN against the loop:", f"{rel:.2e}")
'
# the LSTM's two recurrences (loop, fused) and the DP ÷ non-DP ratios, batch 256
part lstm 120 python3 -m $M.bench --device cuda --repeats 3 --batch 256 \
    --models lstm,project-cnn,transformer
# issue 14's round table: mnist-cnn's training one by one and vectorized, whole runs with
# clients-per-worker 1 and 10 (seconds a round, round 1, GPU utilisation)
part rounds 180 python3 -m $M.bench --device cuda --repeats 3 --batch 256 \
    --models project-cnn --rounds --data-dir .gpu/data/mnist
# the cohort against one by one: issue 14's 10- and 100-client workloads
part cohort 90 python3 -m $M.bench_cohort --device cuda --suite --repeats 1
part noise 40 python3 -m $M.bench_noise --device cuda --batch 64,256
part graphs 40 python3 -m $M.bench_graphs --device cuda
# not by default: the LSTM as a cohort (Opacus's DPLSTM cells under vmap, fedsim.dp.recurrent)
# against one client at a time (FastDPLSTM on cuDNN)
part rnn 90 python3 -m $M.bench_cohort --device cuda --model lstm --clients 10 --steps 5 \
    --batch 64 --repeats 1
# not by default: the cohort round of an older checkout in .gpu/base against this one, side
# by side (e.g. git archive a1444d6 pyproject.toml fedsim clients server experiments |
# tar -x -C .gpu/base: before the cohort's operator cuts of 2026-11-27)
if [ -d .gpu/base ]; then
    for tree in .gpu/base . .gpu/base .; do
        PYTHONPATH=/tmp/site:$ROOT/$tree part ab 60 python3 -P -m $M.bench_cohort --device cuda \
            --model cnn --clients 10 --steps 23 --batch 256 --repeats 3
    done
fi
# not by default (the round table gives round 1 too): start-up of the real command
part startup 90 python3 -m $M.bench_startup --repeat 2 \
    --set "dataset=\"mnist\" data-dir=\"$ROOT/.gpu/data/mnist\" client-gpus=0.1"
tail -n 3 "$OUT"/*.txt
