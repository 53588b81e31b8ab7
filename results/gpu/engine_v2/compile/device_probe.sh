#!/usr/bin/env bash
# The device script of the compile probe (it ran this directory's probe_compile.py as bench/_probe_compile.py): GPU tests, then probes "timeout:variant:shape:batches:cache".
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 260 bash bench/device_run.sh gputests
P() { local t=$1 v=$2 shape=$3 b=$4 cache=$5; shift 5
  echo "== probe $shape $v $b cache=$cache $(date +%T)" | tee -a $OUT/probe.txt
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$cache TRITON_CACHE_DIR=/tmp/tc_$cache PYTHONPATH=$PWD timeout $t /tmp/triton-bundle/venv/bin/python3 -m bench._probe_compile $shape $v $b >>$OUT/probe_full.txt 2>&1
  echo "rc=$?" >> $OUT/probe.txt; grep '^PROBE' $OUT/probe_full.txt | tail -1 >> $OUT/probe.txt; }
for spec in "$@"; do IFS=: read t v shape b cache <<<"$spec"; P $t $v $shape $b $cache; done
tail -c 3000 $OUT/probe_full.txt
