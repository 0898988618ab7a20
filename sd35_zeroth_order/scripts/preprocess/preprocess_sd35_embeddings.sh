#!/usr/bin/env bash
# Pre-compute the SD3.5 prompt embeddings of one prompt preset (spec §1.3), where the trainer reads them.
#
#   PROMPT_PRESET=geneval GPU_NUM=4 bash scripts/preprocess/preprocess_sd35_embeddings.sh
#
# Defaults come from the repository layout, not the working directory: prompts from
# <repo>/data/<preset>/ (written by `python scripts/fetch_data.py`), embeddings to
# <repo>/cache/sd35_embeddings/<preset>/{train,test}_embeddings.h5, the paths
# config/sd3_reward_presets.py:apply_reward_preset gives the trainer. Runs `python -m
# sd35zo.preprocess_embeddings` on one process, or on GPU_NUM processes with accelerate launch (GPUs) or
# torchrun (no GPU: accelerate launch --cpu starts one process only).
set -euo pipefail

COMPONENT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPO_ROOT="$(cd "$COMPONENT_ROOT/.." && pwd)"
PRESETS="pickscore ocr geneval"
ME=preprocess_sd35_embeddings.sh

usage() {
  cat <<EOF
usage: [VAR=value ...] bash scripts/preprocess/preprocess_sd35_embeddings.sh

Encodes a train and a test prompt file with SD3.5's three text encoders into HDF5 files the trainer
reads (sd35zo/embeddings.py). Settings are environment variables:

  PROMPT_PRESET      one of: $PRESETS (default pickscore)
  GPU_NUM            processes (default 1); > 1 uses accelerate launch, or torchrun without a GPU
  MIXED_PRECISION    no | fp16 | bf16 (default fp16): encoder and stored dtype
  PRETRAINED_MODEL   hub id or local diffusers directory (default stabilityai/stable-diffusion-3.5-medium)
  OUTPUT_DIR         default $REPO_ROOT/cache/sd35_embeddings/<preset>
  TRAIN_PROMPT_FILE  default $REPO_ROOT/data/<preset>/train.txt (geneval: train_metadata.jsonl)
  TEST_PROMPT_FILE   default $REPO_ROOT/data/<preset>/test.txt (geneval: test_metadata.jsonl)
  BATCH_SIZE         prompts per encoder call (default 64)
  MAIN_PROCESS_PORT  rendezvous port for GPU_NUM > 1 (default 29501)
  PYTHON, ACCELERATE, TORCHRUN   executables (default python3, accelerate, \$PYTHON -m torch.distributed.run)
  ACCELERATE_USE_CPU=true        run on the CPU even where a GPU is visible

The default prompt files come from: python scripts/fetch_data.py --out data --only <preset>  (in $REPO_ROOT)
EOF
}

die() {
  echo "$ME: $1" >&2
  exit 1
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (settings are environment variables; see --help)" ;;
esac
[[ $# -le 1 ]] || die "unknown argument: $2 (settings are environment variables; see --help)"

preset="${PROMPT_PRESET:-pickscore}"
case "$preset" in
  geneval) train_name=train_metadata.jsonl test_name=test_metadata.jsonl ;;  # prompts with detector metadata
  pickscore|ocr) train_name=train.txt test_name=test.txt ;;
  *) die "PROMPT_PRESET must be one of: $PRESETS (got '$preset')" ;;
esac
num_processes="${GPU_NUM:-1}"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "GPU_NUM must be a positive integer (got '$num_processes')"
mixed_precision="${MIXED_PRECISION:-fp16}"
[[ "$mixed_precision" =~ ^(no|fp16|bf16)$ ]] || die "MIXED_PRECISION must be one of: no fp16 bf16 (got '$mixed_precision')"
batch_size="${BATCH_SIZE:-64}"
[[ "$batch_size" =~ ^[1-9][0-9]*$ ]] || die "BATCH_SIZE must be a positive integer (got '$batch_size')"
port="${MAIN_PROCESS_PORT:-29501}"
[[ "$port" =~ ^[0-9]+$ ]] || die "MAIN_PROCESS_PORT must be an integer (got '$port')"
model="${PRETRAINED_MODEL:-stabilityai/stable-diffusion-3.5-medium}"
output_dir="${OUTPUT_DIR:-$REPO_ROOT/cache/sd35_embeddings/$preset}"
train_file="${TRAIN_PROMPT_FILE:-$REPO_ROOT/data/$preset/$train_name}"
test_file="${TEST_PROMPT_FILE:-$REPO_ROOT/data/$preset/$test_name}"
for prompt_file in "$train_file" "$test_file"; do
  [[ -f "$prompt_file" ]] || die "prompt file not found: $prompt_file (fetch the prompt sets: \
cd $REPO_ROOT && python scripts/fetch_data.py --out data --only $preset)"
done

PYTHON="${PYTHON:-python3}"
ACCELERATE="${ACCELERATE:-accelerate}"
export PYTHONPATH="$COMPONENT_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # sd35zo, from any working directory

module=(-m sd35zo.preprocess_embeddings --output_dir "$output_dir" --train_prompt_file "$train_file"
        --test_prompt_file "$test_file" --pretrained_model "$model" --mixed_precision "$mixed_precision"
        --batch_size "$batch_size")
if [[ "$num_processes" == 1 ]]; then
  command=("$PYTHON" "${module[@]}")  # Accelerator() alone picks the GPU if there is one
else
  use_cpu="${ACCELERATE_USE_CPU:-}"
  if [[ ! "$use_cpu" =~ ^(1|true|True|yes)$ ]]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
      && use_cpu=no || use_cpu=true
  fi
  if [[ "$use_cpu" == no ]]; then
    command=("$ACCELERATE" launch --num_machines 1 --num_processes "$num_processes" --main_process_port "$port"
             "${module[@]}")
  else
    # the ranks come from torchrun's environment; ACCELERATE_USE_CPU keeps Accelerator() on gloo
    if [[ -n "${TORCHRUN:-}" ]]; then torchrun=("$TORCHRUN"); else torchrun=("$PYTHON" -m torch.distributed.run); fi
    command=(env ACCELERATE_USE_CPU=true "${torchrun[@]}" --nnodes 1 --nproc_per_node "$num_processes"
             --master_port "$port" "${module[@]}")
  fi
fi

echo "preset=${preset} processes=${num_processes} mixed_precision=${mixed_precision} model=${model}"
echo "train=${train_file}"
echo "test=${test_file}"
echo "output_dir=${output_dir}"
exec "${command[@]}"
