#!/usr/bin/env bash
# Every GPU check of the training-speed work in one call, sized for a short lease (~10 minutes):
#   1. the machine: nvidia-smi and package versions                         -> env.txt
#   2. the step benchmark on the full SDXL UNet (random weights)             -> results.json, bench.log
#   3. the GPU tests (tests/test_gpu.py): no host syncs in the step, nor in
#      `train.py fit` between logging steps, compiled blocks and channels-last
#      keep the numbers, `train.py fit` starts under DDP, FSDP,
#      BlockFSDPStrategy and DeepSpeed ZeRO-2 and 3 on one GPU               -> tests.log
# Results go to $OUT (default runs/device_check). Each stage has its own time limit, and the
# benchmark writes its JSON after every configuration, so a stage that runs long still leaves
# what it measured.
#
# Packages the machine lacks travel as wheels in .whl/ (benchmarks/device_requirements.txt says how
# to fetch them); they are installed into /tmp/site first when present.
#
#   bash benchmarks/device_check.sh                       # on the GPU machine
#   CHECK_TINY=1 bash benchmarks/device_check.sh          # the same stages on a CPU: tests skip, tiny benchmark
set -uo pipefail
OUT=${OUT:-runs/device_check}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-300}
TEST_LIMIT_S=${TEST_LIMIT_S:-270}
# what the first H200 lease (benchmarks/RESULTS.md) left open, most wanted first: a profile of the b8
# step, b8 within 80 GB, LoRA compiled, CUDA graphs in the compiled blocks (reduce-overhead: against
# the ~316 ms a step that did not grow with the batch), then compile_all (~140 s of compiling; cut
# first by the limit)
BENCH_CONFIGS=${BENCH_CONFIGS:-"b2+original b8+compile b8+ckpt=save_matmuls+compile b8+lora16+compile b8+compile=reduce-overhead b8+compile_all"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# fewer fragmentation failures when configurations of different sizes follow each other
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if compgen -G ".whl/*.whl" >/dev/null; then
    # pip picks each requirement's wheel for this Python out of .whl (it may hold several)
    wheels=(python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir
            --upgrade --target /tmp/site)
    "${wheels[@]}" -r benchmarks/device_requirements.txt || exit 1
    if compgen -G ".whl/deepspeed-*.whl" >/dev/null; then "${wheels[@]}" deepspeed || exit 1; fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

stage "1/3 the machine"
{
    date -u
    nvidia-smi || echo "no nvidia-smi"
    python3 -c "import sys, torch, lightning, diffusers, transformers, peft; \
print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); \
print('lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

stage "2/3 step benchmark (limit ${BENCH_LIMIT_S} s): $BENCH_CONFIGS"
bench=(python3 benchmarks/step_throughput.py --out "$OUT/results.json" --steps 5 --warmup 2 --profile)
if [[ -n "${CHECK_TINY:-}" ]]; then
    bench+=(--tiny --threads 1 --configs b2+original b4)
else
    # shellcheck disable=SC2206  # the configurations are words on purpose
    mkdir -p /tmp/popalign_bench
    bench+=(--workdir /tmp/popalign_bench --configs $BENCH_CONFIGS)
fi
timeout -k 10 "$BENCH_LIMIT_S" "${bench[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

stage "3/3 GPU tests (limit ${TEST_LIMIT_S} s)"
timeout -k 10 "$TEST_LIMIT_S" python3 -m pytest -v --tb=short -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

stage "done: tests exit $tests_rc, benchmark exit $bench_rc (124: stopped at its limit); files in $OUT"
ls -la "$OUT"
[[ $tests_rc == 0 && $bench_rc == 0 ]]
