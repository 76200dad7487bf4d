#!/usr/bin/env bash
# Everything the GPU runs, in stages, from the repo root:  bash scripts/device.sh STAGE [STAGE...]
#   model  assemble the SmolLM2 GGUF from /root/smol/part_* and convert it (the parts travel in earlier calls:
#          split the GGUF so each call's working tree stays under the device tool's 64 MiB, copy each to /root/smol).
#          The tree with the six shipped heads is 57 MB, so the GGUF travels in two calls from a branch with heads/
#          removed (7 MB): `../shared/tools/smollm2_gguf.sh .models --split` leaves .models/half_a/part_aa (52 MB)
#          and .models/half_b/part_ab (46 MB); carry half_a with `cp .models/half_a/* /root/smol/`, then half_b with
#          `cp .models/half_b/* /root/smol/ && bash scripts/device.sh model`; later calls from main carry nothing
#          (the heads are in its tree; keep it under 64 MiB: bench/ JSON over 100 kB is gzipped)
#          Stages that read the ShareGPT prompts (data, e2e, data-mix, tasks, kernels, sweep) need PROMPTS
#          (.models/sharegpt_questions.jsonl, git-ignored): carry it on each such call.
#   check  kernel check (benchmark.py check) and GPU tests
#   paths  path_attention's programs (kernels.PATH_PROGRAMS) and warps, the matmuls' K steps (MATMUL_K_TILE): the
#          kernel check with PATH_PROGRAMS and K_TILE set, then SmolLM2 step times and profiles for several of each
#          and for shorter splits, and 7B step times by K steps (random weights: no model)
#   stages the matmuls at MATMUL_STAGES (4) pipeline stages: kernel check and GPU tests, then step times by stages
#   floor  the cost of one link in a chain of dependent kernels in a CUDA graph (scripts/launch_floor.py: empty
#          and with 1.8 MB of weights a link, plain and dependent launch; no model, a few seconds)
#   ab     a kernel change against the kernels before it, in one call: step times at batches 8 and 1, short and long
#          caches, from this tree and from a copy of it with runs/old_kernels.py (`git show REV:kernels.py >
#          runs/old_kernels.py`, carried: runs/ is ignored), one after the other, twice (no model)
#   settings-e2e  the default and each of SETTINGS (e.g. "HYDRA_LITE_PATH_EDGE_TOKENS=5 HYDRA_LITE_PDL=0": one
#          environment setting each) end to end, 60 prompts, batches 1 and 8, each against AR with it (every output
#          == AR is in each tasks.json)
#   split  path_attention's split length 256 / 512 / 1,024, tiles of 16 / 64 rows, 8 warps, 1-2 stages, programs: bits
#          checked, steps at batches 8 and 1, short and long caches (no model)
#   split-e2e  the same end to end (SPLIT_TILES="16x256 64x512 ...": rows x split length), 60 prompts, batches 1, 8
#   edge   path_attention's tokens past the cache per program (kernels.PATH_EDGE_TOKENS): bits checked, steps at
#          batches 8 and 1 (no model)
#   steps  step-time roofline tables (7B shape and SmolLM2 shape, random weights); STEPS_FLAGS adds flags (e.g. --profile)
#   fused  the fused decoder layers (the default; HYDRA_LITE_FUSED=0: op by op): kernel check, their GPU tests, step
#          times against the unfused layers and the previous kernels (random weights: needs no model)
#   data   self-distillation data: rows 0-79 of the prompts (SAMPLES answers each), SYNTH template prompts
#          (SEED picks them) and IMITATE prompts the base model writes in the style of those rows, into DATA,
#          BATCH rows at a time, MAX_NEW tokens each, fewer if it would take over DATA_TIME seconds
#   train  Medusa, Hydra and Hydra++ heads (KINDS) on DATA (comma-separated files), STEPS steps (fewer if they
#          would take over TIME_LIMIT seconds), N_LAYERS blocks per head, learning rate LR; INIT=DIR: go on
#          training those heads instead (one KIND)
#   e2e    end-to-end benchmark on the held-out rows 80-99 (bf16), and a float32 exact-match run
#   data-mix  data for heads that generalize: answers to the multi-task training prompts (TASKS_TRAIN, made by
#          tasks/build_tasks.py --split train) at temperatures 0 and 0.7, and to IMITATE prompts the model writes
#          in the style of ShareGPT rows 0-79, into $WORK/data_tasks.npz and $WORK/data_chat.npz (TASK_SAMPLES answers
#          a training prompt at TASK_TEMPS; CHAT_SAMPLES answers each ShareGPT row 0-79, default 4)
#   train-mix  Hydra++ heads fine-tuned from INIT on both (draft vocabulary sized by coverage: auto), TIME_LIMIT s;
#          N_LAYERS: blocks per head, more than INIT's to grow them (new blocks start as the identity)
#          N_HEADS: heads, more than INIT's to grow them (new ones start as copies of the last)
#   keep   the trained heads with CONTEXT_TREE_FROM's tree (default: the shipped heads') as tree_context.json, the
#          tree used beside context drafts, into $WORK/heads-ctx (six heads drafting four deep there)
#   tasks  the multi-task benchmark (tasks/heldout.jsonl + ShareGPT rows 80-99): AR vs TASK_HEADS (NAME=DIR ...)
#          with and without context drafts, and context drafts alone, batches TASK_BATCH; TASK_FLAGS adds flags
#   kernels  real-model tokens/s with each kernel set (exact, fused-heads, fast), heads with and without context drafts
#   prefill  a batched prefill's padding skipped (hl.PREFILL_SKIP, the default): its GPU tests, then tokens/s of
#          exact, no-prefill-skip and fast kernels in one run, batches 1 and 8
#   sweep  tree size at batches 8 and 32 (SWEEP_NODES head nodes, static and dynamic trees, beside a SWEEP_CONTEXT-token
#          context chain, default 10; SWEEP_BATCH, SWEEP_TREES), 45 prompts
#   latency  time to first token, per-token latency and per-call overhead by prompt length and batch, first vs
#          repeated call, without and with Generator.warmup()
#   pack   results into $OUT/results.tar and the trained heads into $OUT/heads.tar.part_* (the device tool
#          returns at most 8 files of 16 MiB)
# Work (checkpoint, data, heads, results) stays in $WORK across calls while the machine is warm. The machine goes
# back after ~30 s idle and takes $WORK with it: end any call whose results matter with `pack` (train-mix pack).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/device}
WORK=${WORK:-/root/hydra}
RES=$WORK/results
CKPT=$WORK/smollm2-135m-instruct
PROMPTS=${PROMPTS:-.models/sharegpt_questions.jsonl}
DATA=${DATA:-$WORK/data.npz}  # (a data.npz brought from an earlier run works too)
# The step cases of the path_attention stages (split, ab): "batch head-nodes chain cached-tokens", each
# batch's default tree over a short and a long cache.
STEP_CASES=("8 16 10 1024" "8 16 10 2048" "1 32 24 512" "1 32 24 2048")
mkdir -p "$OUT" "$WORK" "$RES"
converted() { if [ -f "$CKPT/config.json" ]; then echo "$CKPT"; fi; }  # the checkpoint once `model` made it, else ""
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    model)
      cat /root/smol/part_* > "$WORK/model.gguf"
      python3 convert.py "$WORK/model.gguf" "$CKPT" ;;
    check)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      python3 benchmark.py check 2>&1 | tee "$RES/kernels_check.txt"
      HYDRA_LITE_CKPT=$(converted) python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -5 ;;
    fused)
      python3 benchmark.py check 2>&1 | tee "$RES/kernels_check.txt" | grep -E "FAIL|all PASS|fused|qkv_rope|worst" || true
      python3 -m pytest -q -x tests/test_gpu.py -k "bit_for_bit or fused or dependent" 2>&1 | tail -3 || true
      for shape in smollm2-135m 7b; do
        wide=$([ $shape = 7b ] && echo "--matmul-wide-n 4097" || true)  # (SmolLM2 has no output 4096 wide)
        python3 benchmark.py steps --shape $shape --unfused --pdl --edge-tokens 0 1 $wide --out "$RES/fused" 2>&1 | tee "$RES/steps_fused_$shape.txt" | grep "^|"
      done ;;
    paths)  # issue 15: path_attention with fewer programs (PATH_PROGRAMS) and other warps, bits checked, then timed
      HYDRA_LITE_PATH_PROGRAMS=${PATH_PROGRAMS:-528} HYDRA_LITE_MATMUL_K_TILE=${K_TILE:-256} python3 benchmark.py check 2>&1 | tee "$RES/check_paths.txt" \
        | grep -E "FAIL|path_attention tree node|all PASS" || true
      python3 benchmark.py steps --shape smollm2-135m --batch 1 8 --path-tiles 16x256 16x128 16x64 --path-programs 264 528 1056 --path-warps 1 2 \
        --matmul-k-tile 256 512 1024 --profile --out "$RES/paths" 2>&1 | tee "$RES/steps_paths.txt" | grep -E "bit for bit|^\|"
      python3 benchmark.py steps --shape 7b --batch 1 --matmul-k-tile 256 512 1024 --matmul-wide-n 4097 --out "$RES/paths" 2>&1 | tee "$RES/steps_paths_7b.txt" | grep "^|" ;;
    stages)  # issue 14 (run 19): the matmuls at MATMUL_STAGES (4) checked against their references and in the GPU
             # tests, then step times by matmul and path_attention stages (random weights: no model)
      export HYDRA_LITE_MATMUL_STAGES=${MATMUL_STAGES:-4}
      python3 benchmark.py check 2>&1 | tee "$RES/check_stages.txt" | grep -E "FAIL|all PASS" || true
      HYDRA_LITE_CKPT=$(converted) python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -3 || true
      python3 benchmark.py steps --shape smollm2-135m --batch 1 8 --matmul-stages 3 5 --path-stages 3 4 --profile --out "$RES/stages" 2>&1 \
        | tee "$RES/steps_stages.txt" | grep -E "bit for bit|^\|"
      python3 benchmark.py steps --shape 7b --batch 1 8 --matmul-stages 3 5 --matmul-wide-n 4097 --path-stages 3 --out "$RES/stages" 2>&1 \
        | tee "$RES/steps_stages_7b.txt" | grep "^|"
      unset HYDRA_LITE_MATMUL_STAGES ;;
    floor)  # issue 14: what a dependent level of a step costs, whatever it computes
      timeout 200 python3 scripts/launch_floor.py 2>&1 | tee "$RES/launch_floor.txt" ;;
    ab)  # the A/B of run 26 (edge programs first): the same steps from both trees; the bits line checks the new one
      [ -f runs/old_kernels.py ] || { echo "ab: carry runs/old_kernels.py (the kernels.py to compare against)" >&2; exit 2; }
      old=$WORK/ab_old && rm -rf "$old" && mkdir -p "$old" && cp ./*.py "$old/" && cp runs/old_kernels.py "$old/kernels.py"
      for round in 1 2; do
        for bt in "${STEP_CASES[@]}"; do read -r b n c x <<< "$bt"
          for v in new old; do
            (cd "$([ $v = old ] && echo "$old" || echo .)" && python3 benchmark.py steps --shape smollm2-135m --batch "$b" \
              --tree-nodes "$n" --tree-chain "$c" --context "$x" $([ $v = new ] && echo --path-tiles 16x256) \
              --out "$RES/ab_${v}_b${b}_c${x}_$round" 2>&1 | grep -E "^b|bit" | grep -v "fast\|path tiles" \
              | sed -E "s/, HBM floor.*//; s/^/$v c$x: /")
          done
        done
      done ;;
    settings-e2e)  # kernel settings end to end (needs the model): a setting's AR runs with it too, so its outputs
                   # can part from the default's (other bits), never from its own AR
      for setting in default ${SETTINGS:?SETTINGS: one or more VAR=VALUE to time against the default}; do
        env $([ "$setting" = default ] || echo "$setting") python3 benchmark.py tasks --checkpoint "$CKPT" --sharegpt "$PROMPTS" \
          --limit 5 --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} --batch 1 8 --context default --context-only 0 \
          --warmup --kernels exact --out "$RES/settings_${setting##*_}" 2>&1 | tee "$RES/settings_${setting##*_}.txt" \
          | grep -E "^b[0-9]+ .*tokens/s|^\| shipped" | sed "s/^/$setting: /"
      done ;;
    split)  # issue 15: path_attention's split length (PATH_SPLIT_LEN; 16-row tiles): batch 8's verification grows
            # with the cache 3x faster than the fast kernels' (run 25); longer splits: fewer programs and partials;
            # 8 warps: 128 registers a thread (16 warps an SM) against 4 warps' 168 (12 warps an SM); 1 stage: 128
            # registers with 4 warps (the pipelined loop takes the rest), 2: 166 (run 20 timed 2-4 at 512 cached only)
      for bt in "${STEP_CASES[@]}"; do read -r b n c x <<< "$bt"
        python3 benchmark.py steps --shape smollm2-135m --batch "$b" --tree-nodes "$n" --tree-chain "$c" --context "$x" \
          --path-tiles 16x256 16x512 16x1024 64x256 64x512 --path-warps 8 --path-stages 1 2 --path-programs 1056 2112 \
          --out "$RES/split_b${b}_c$x" 2>&1 | tee "$RES/split_b${b}_c$x.txt" | grep -E "^b|bit"
      done ;;
    split-e2e)  # issue 15: the same, end to end (60 prompts, batches 1 and 8, the default trees), each setting
                # against AR with it; fast kernels once, beside them
      for ts in ${SPLIT_TILES:-16x256 16x512 64x256 64x512}; do
        HYDRA_LITE_PATH_TILE_ROWS=${ts%x*} HYDRA_LITE_PATH_SPLIT_LEN=${ts#*x} python3 benchmark.py tasks --checkpoint "$CKPT" \
          --sharegpt "$PROMPTS" --limit 5 --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} --batch 1 8 --context default \
          --context-only 0 --warmup --kernels exact $([ "$ts" = 16x256 ] && echo fast) --out "$RES/split_$ts" 2>&1 \
          | tee "$RES/split_$ts.txt" | grep -E "^b[0-9]+ .*tokens/s" | sed "s/^/$ts: /"
      done ;;
    edge)  # issue 15: path_attention's edge tokens per program (PATH_EDGE_TOKENS), bits checked, timed with each
           # batch's default tree (batch 8: 16 head nodes + a 10-token chain; batch 1: 32 + 24)
      for bt in "8 16 10" "1 32 24"; do read -r b n c <<< "$bt"
        python3 benchmark.py steps --shape smollm2-135m --batch "$b" --tree-nodes "$n" --tree-chain "$c" \
          --context ${EDGE_CONTEXT:-1024} --edge-tokens 1 2 3 5 --out "$RES/edge_b$b" 2>&1 | tee "$RES/edge_b$b.txt" | grep -E "^b|bit"
      done ;;
    steps)
      python3 benchmark.py steps --shape 7b ${STEPS_FLAGS:-} --out "$RES" 2>&1 | tee "$RES/steps_7b.txt"
      python3 benchmark.py steps --shape smollm2-135m ${STEPS_FLAGS:-} --out "$RES" 2>&1 | tee "$RES/steps_smollm2.txt" ;;
    data)
      python3 train_heads.py data --checkpoint "$CKPT" --prompts "$PROMPTS" --rows 0-79 --samples ${SAMPLES:-24} --temperatures ${TEMPS:-0,0.3,0.7,1.0} \
        --synthetic ${SYNTH:-12000} --imitate ${IMITATE:-0} --seed ${SEED:-0} --max-new-tokens ${MAX_NEW:-384} --batch ${BATCH:-192} --time-limit ${DATA_TIME:-0} --out "$DATA" 2>&1 | tee "$RES/data.txt" | awk 'NR % 10 == 1 || /wrote|rror/' ;;
    train)
      for kind in ${KINDS:-hydra++ medusa hydra}; do
        python3 train_heads.py train --checkpoint "$CKPT" --data "$DATA" --kind $kind --steps ${STEPS:-3000} --n-layers ${N_LAYERS:-2} --time-limit ${TIME_LIMIT:-0} \
          --lr ${LR:-1e-3} ${INIT:+--init "$INIT"} --out "$WORK/heads-$kind" 2>&1 | tee "$RES/train-$kind.txt" | grep -v "^step [0-9]*[1-9]/" | tail -12
      done ;;
    e2e)
      H=$WORK
      python3 benchmark.py e2e --checkpoint "$CKPT" --prompts "$PROMPTS" --rows 80-99 --batch 1 8 --profile \
        --heads ${E2E_HEADS:-medusa=$H/heads-medusa hydra=$H/heads-hydra hydra++=$H/heads-hydra++} ${E2E_FLAGS:-} --out "$RES" 2>&1 | tee "$RES/e2e.txt"
      python3 benchmark.py e2e --checkpoint "$CKPT" --prompts "$PROMPTS" --rows 80-99 --limit 8 --batch 1 4 --dtype float32 \
        --no-hf --heads hydra++=$H/heads-hydra++ --out "$RES/fp32" 2>&1 | tee "$RES/e2e_fp32.txt" ;;
    data-mix)  # (the fast kernels: answers to learn from need no bit-exact decoding, and they are quicker in big batches)
      if [ -f "${TASKS_TRAIN:-runs/tasks_train.jsonl}.gz" ]; then gunzip -kf "${TASKS_TRAIN:-runs/tasks_train.jsonl}.gz"; fi
      HYDRA_LITE_EXACT=${DATA_EXACT:-0} python3 train_heads.py data --checkpoint "$CKPT" --prompts "${TASKS_TRAIN:-runs/tasks_train.jsonl}" --samples ${TASK_SAMPLES:-2} --temperatures ${TASK_TEMPS:-0,0.7} \
        --max-new-tokens ${MAX_NEW:-256} --batch ${BATCH:-256} --time-limit ${DATA_TIME:-170} --out "$WORK/data_tasks.npz" 2>&1 | tee "$RES/data_tasks.txt" | awk 'NR % 10 == 1 || /wrote|rror/'
      HYDRA_LITE_EXACT=${DATA_EXACT:-0} python3 train_heads.py data --checkpoint "$CKPT" --prompts "$PROMPTS" --rows 0-79 --samples ${CHAT_SAMPLES:-4} --temperatures 0,0.3,0.7 --imitate ${IMITATE:-8000} \
        --seed 4 --max-new-tokens ${MAX_NEW:-256} --batch ${BATCH:-256} --time-limit ${DATA_TIME2:-130} --out "$WORK/data_chat.npz" 2>&1 | tee "$RES/data_chat.txt" | awk 'NR % 10 == 1 || /wrote|rror/' ;;
    train-mix)
      python3 train_heads.py train --checkpoint "$CKPT" --data "$WORK/data_tasks.npz,$WORK/data_chat.npz" --init "${INIT:-heads/smollm2-135m-hydra++}" ${N_LAYERS:+--n-layers $N_LAYERS} ${N_HEADS:+--n-heads $N_HEADS} \
        --draft-vocab ${VOCAB:-auto} --lr ${LR:-5e-4} --steps 100000 --time-limit ${TIME_LIMIT:-300} --out "$WORK/heads-hydra++" 2>&1 \
        | tee "$RES/train-mix.txt" | grep -v "^step [0-9]*[1-9]/" | tail -14 ;;
    keep)  # the trained heads ($WORK/heads-hydra++) with CONTEXT_TREE_FROM's tree beside context drafts, into $WORK/heads-ctx
      python3 train_heads.py keep --checkpoint "$CKPT" --init "$WORK/heads-hydra++" --n-heads ${N_HEADS:-6} \
        --context-tree-from "${CONTEXT_TREE_FROM:-heads/smollm2-135m-hydra++}" --out "$WORK/heads-ctx" 2>&1 | tail -2 ;;
    tasks)
      python3 benchmark.py tasks --checkpoint "$CKPT" --sharegpt "$PROMPTS" --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} \
        --batch ${TASK_BATCH:-1 8 32} --context 0 default --context-only 10 --warmup ${TASK_FLAGS:-} --out "$RES/tasks${TAG:-}" 2>&1 | tee "$RES/tasks${TAG:-}.txt" | grep -v "warm-up" ;;
    kernels)  # the real model's tokens/s by kernel set (issue 15's cost; the draft heads' fused blocks), every
              # method against AR with the same kernels, in one run: 45 prompts (5 per family), batches 1 and 8
      python3 benchmark.py tasks --checkpoint "$CKPT" --sharegpt "$PROMPTS" --limit ${KERNELS_LIMIT:-5} --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} \
        --batch 1 8 --context 0 default --context-only 0 --warmup --kernels exact fused-heads fast --out "$RES/kernels" 2>&1 | tee "$RES/kernels.txt" | grep -v "warm-up" ;;
    prefill)  # issues 14, 15: a batched prefill's padding skipped (hl.PREFILL_SKIP): the GPU tests of it (bits), then
              # tokens/s against the exact and the fast kernels in one run, 45 prompts, batches 1 and 8
      HYDRA_LITE_CKPT=$(converted) python3 -m pytest -q tests/test_gpu.py -k "prefill_skipping or half_speculative" 2>&1 | tail -3
      python3 benchmark.py tasks --checkpoint "$CKPT" --sharegpt "$PROMPTS" --limit 5 --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} \
        --batch 1 8 --context default --context-only 0 --warmup --kernels exact no-prefill-skip fast --out "$RES/prefill" 2>&1 \
        | tee "$RES/prefill.txt" | grep -v "warm-up" | grep -v "parts from AR" ;;
    sweep)  # head-tree nodes at larger batches: 45 prompts (5 per family), each size against AR in the same run
      for n in ${SWEEP_NODES:-8 16 32}; do
        python3 benchmark.py tasks --checkpoint "$CKPT" --sharegpt "$PROMPTS" --limit 5 --heads ${TASK_HEADS:-shipped=heads/smollm2-135m-hydra++} \
          --batch ${SWEEP_BATCH:-8 32} --context ${SWEEP_CONTEXT:-10} --trees ${SWEEP_TREES:-static dynamic} --tree-nodes $n --warmup --out "$RES/sweep$n" 2>&1 \
          | tee "$RES/sweep$n.txt" | grep -v "warm-up" | tail -12
      done ;;
    latency)
      for W in "" --warmup; do
        python3 benchmark.py latency --checkpoint "$CKPT" --heads heads/smollm2-135m-hydra++ $W --out "$RES/latency$W" 2>&1 | tee "$RES/latency$W.txt" | grep "^|"
      done ;;
    pack)
      tar cf "$OUT/results.tar" -C "$RES" .
      # (heads-ctx is heads-hydra++ with tree_context.json: one of the two, so that six heads fit the 64 MiB back)
      heads=${PACK_HEADS:-$(cd "$WORK" && if [ -d heads-ctx ]; then echo heads-ctx; else ls -d heads-* 2>/dev/null || true; fi)}
      if [ -n "$heads" ]; then tar cf - -C "$WORK" --exclude=heads-hydra $heads | split -b 15M - "$OUT/heads.tar.part_"; fi
      ls -la "$OUT" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
