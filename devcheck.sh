#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_generation.py 2>&1 | tail -25 | tee $OUT/pytest.txt
timeout 100 python3 benchmarks/decode_vs_transformers.py --device cuda --reps 7 2>&1 | tee $OUT/bench_fp32.txt
timeout 50 python3 benchmarks/decode_vs_transformers.py --device cuda --dtype bf16 --reps 7 --vocab 30000 2>&1 | tee $OUT/bench_bf16.txt
echo done
