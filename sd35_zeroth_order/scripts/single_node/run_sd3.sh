#!/usr/bin/env bash
# Launch one SD3.5-Medium run of the config matrix on this machine (spec §1.1).
#
#   bash scripts/single_node/run_sd3.sh --profile lowsnr2 --sampler branch --reward geneval \
#        --loss matching --reweight fairclip2 --num-processes 4          # the paper's Figure 4(a) "Ours"
#
# Builds the config id sd3.<profile>.<sampler>.<reward>.<loss>.<reweight>, checks the resolved config for
# the chosen number of processes, its files, model and run folder (sd35zo/config_check.py: one line saying
# what is wrong, before any process starts), then runs `accelerate launch ... scripts/train_sd3.py|
# train_sd3_pr.py --config config/sd3_matrix.py:<id>` (one process: the script directly). Everything after
# `--` is passed to the trainer, e.g. config overrides `-- --config.train.learning_rate=1e-4`. CPU runs
# (--tiny, --cpu) on more than one process start them with torchrun instead: `accelerate launch --cpu`
# always starts a single process.
set -euo pipefail
trap '' HUP  # long runs survive the terminal closing

COMPONENT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CALLER_DIR="$PWD"  # --output-dir and a --model path are relative to where the user typed the command

PROFILES="base highsnr highsnr2 base2 lowsnr lowsnr2"
SAMPLERS="default branch"
REWARDS="geneval ocr pickscore deqa imagereward qwenvl aesthetic jpeg_compressibility unifiedreward"
LOSSES="ppo matching"
REWEIGHTS="base tempflow pcpo guard fairclip fairclip2"

usage() {
  cat <<EOF
usage: bash scripts/single_node/run_sd3.sh [options] [-- trainer args]

  --profile P            one of: $PROFILES (default base); branch steps and counts (branch sampler)
  --sampler S            one of: $SAMPLERS (default default); default = scripts/train_sd3.py,
                         branch = scripts/train_sd3_pr.py
  --reward R             one of: $REWARDS (default pickscore)
  --loss L               one of: $LOSSES (default ppo)
  --reweight W           one of: $REWEIGHTS (default base)
  --num-processes N      processes to start on this node (default: the reward preset's world size, 4
                         for geneval, 2 otherwise; 1 with --tiny). Budgets follow the world size
                         N x machines: the global images per epoch stay fixed and accumulation grows
                         as it shrinks. On a CPU (--tiny, --cpu) N > 1 or several machines run under
                         torchrun (gloo), since accelerate launch --cpu starts one process
  --num-machines M       nodes in the job (default 1); run the same command on every node with its
                         own --machine-rank (--dry-run prints each node's command)
  --machine-rank R       this node's rank, 0..M-1 (default 0); rank 0 writes checkpoints and logs
  --main-process-ip IP   address of the rank-0 node (required with M > 1)
  --main-process-port P  default 29502 (default sampler) or 29700 (branch sampler); torchrun's
                         --master_port on CPU runs
  --accelerate-config F  passed to accelerate launch as --config_file F (not for torchrun runs); its
                         num_processes / num_machines / machine_rank / main_process_ip hold unless
                         the flags above are given
  --model M              base model: hub id or local diffusers directory (config pretrained.model)
  --output-dir D         where checkpoints and logs go (config save_dir)
  --tiny                 the same run on the tiny test kit (rsm_testkit): tiny SD3 and reward models,
                         its own prompts and embeddings, 64 px, a few rows per epoch, CPU; a served
                         reward (geneval, deqa, qwenvl, unifiedreward) gets the kit's server, started
                         beside the run and stopped with it
  --cpu                  run on the CPU (implied by --tiny)
  --dry-run              check the config and print the command instead of running it
  --list                 print the supported values of the five id fields and exit
  -h, --help             this text
  -- ARGS                passed to the trainer unchanged, e.g. -- --config.train.learning_rate=1e-4

Environment: PYTHON (default python3) and ACCELERATE (default accelerate) name the executables;
TORCHRUN (default: \$PYTHON -m torch.distributed.run) starts CPU runs with N > 1.
WANDB_API_KEY turns on wandb logging (off otherwise; --config.wandb.mode=offline logs offline without a key).
TEMPFLOW_GENEVAL_REWARD_URL, TEMPFLOW_DEQA_REWARD_URL, TEMPFLOW_QWENVL_REWARD_URL and
TEMPFLOW_UNIFIEDREWARD_URL point the service-backed rewards at their servers (or override
--config.reward_options.<reward>.url). Cluster network settings (e.g. NCCL_IB_HCA, NCCL_IB_GID_INDEX
for InfiniBand) are not set here: export what your cluster needs before launching.
EOF
}

die_usage() {
  echo "run_sd3.sh: $1" >&2
  usage >&2
  exit 1
}

need_value() {  # <flag> <number of remaining args> <next arg>
  [[ "$2" -ge 2 && "${3:-}" != --* ]] || die_usage "$1 needs a value"
}

profile=base sampler=default reward=pickscore loss=ppo reweight=base
num_processes="" main_process_port="" accelerate_config="" model="" output_dir=""
num_machines="" machine_rank="" main_process_ip=""
tiny=0 cpu=0 dry_run=0
trainer_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) need_value "$1" $# "${2:-}"; profile="$2"; shift 2 ;;
    --sampler) need_value "$1" $# "${2:-}"; sampler="$2"; shift 2 ;;
    --reward) need_value "$1" $# "${2:-}"; reward="$2"; shift 2 ;;
    --loss) need_value "$1" $# "${2:-}"; loss="$2"; shift 2 ;;
    --reweight) need_value "$1" $# "${2:-}"; reweight="$2"; shift 2 ;;
    --num-processes) need_value "$1" $# "${2:-}"; num_processes="$2"; shift 2 ;;
    --main-process-port) need_value "$1" $# "${2:-}"; main_process_port="$2"; shift 2 ;;
    --num-machines) need_value "$1" $# "${2:-}"; num_machines="$2"; shift 2 ;;
    --machine-rank) need_value "$1" $# "${2:-}"; machine_rank="$2"; shift 2 ;;
    --main-process-ip) need_value "$1" $# "${2:-}"; main_process_ip="$2"; shift 2 ;;
    --accelerate-config) need_value "$1" $# "${2:-}"; accelerate_config="$2"; shift 2 ;;
    --model) need_value "$1" $# "${2:-}"; model="$2"; shift 2 ;;
    --output-dir) need_value "$1" $# "${2:-}"; output_dir="$2"; shift 2 ;;
    --tiny) tiny=1; cpu=1; shift ;;
    --cpu) cpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --list)
      printf 'profiles: %s\nsamplers: %s\nrewards: %s\nlosses: %s\nreweights: %s\n' \
        "$PROFILES" "$SAMPLERS" "$REWARDS" "$LOSSES" "$REWEIGHTS"
      exit 0 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_args=("$@"); break ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done

# The sampler picks the script; every other field is checked by the config module (one line per error).
case "$sampler" in
  default) train_script=scripts/train_sd3.py; default_port=29502 ;;
  branch) train_script=scripts/train_sd3_pr.py; default_port=29700 ;;
  *) die_usage "--sampler must be one of: $SAMPLERS (got '$sampler')" ;;
esac
num_processes_given="$num_processes" num_machines_given="$num_machines"
if [[ -n "$accelerate_config" && -z "$num_processes$num_machines" ]]; then
  # the accelerate config file decides the layout (its num_processes counts every machine's processes)
  [[ -f "$accelerate_config" ]] || die_usage "--accelerate-config: no such file: $accelerate_config"
  layout="$("${PYTHON:-python3}" -c 'import sys, yaml
c = yaml.safe_load(open(sys.argv[1])) or {}
m = int(c.get("num_machines") or 1)
print(max(int(c.get("num_processes") or 1) // m, 1), m, int(c.get("machine_rank") or 0), c.get("main_process_ip") or "")' \
    "$accelerate_config")" || die_usage "--accelerate-config: cannot read $accelerate_config as an accelerate config"
  read -r num_processes num_machines config_machine_rank config_ip <<<"$layout"
  machine_rank="${machine_rank:-$config_machine_rank}"
  main_process_ip="${main_process_ip:-$config_ip}"
fi
num_machines="${num_machines:-1}"
machine_rank="${machine_rank:-0}"
[[ "$num_machines" =~ ^[1-9][0-9]*$ ]] || die_usage "--num-machines must be a positive integer (got '$num_machines')"
[[ "$machine_rank" =~ ^[0-9]+$ && "$machine_rank" -lt "$num_machines" ]] \
  || die_usage "--machine-rank must be 0..$((num_machines - 1)) for --num-machines $num_machines (got '$machine_rank')"
if [[ "$num_machines" -gt 1 && -z "$main_process_ip" ]]; then
  die_usage "--num-machines $num_machines needs --main-process-ip: the address of the rank-0 node"
fi
if [[ -z "$num_processes" ]]; then
  if [[ "$tiny" == 1 ]]; then num_processes=1
  elif [[ "$reward" == geneval ]]; then num_processes=4  # the geneval preset's world size (sd3_reward_presets.py)
  else num_processes=2
  fi
fi
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die_usage "--num-processes must be a positive integer (got '$num_processes')"
absolute() {  # <path>: made absolute against the caller's directory
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "$CALLER_DIR/$1"; fi
}
[[ -n "$output_dir" ]] && output_dir="$(absolute "$output_dir")"
# a --model that exists as a path is a path; anything else is passed on as a hub id
[[ -n "$model" && ( -e "$model" || "$model" == ./* || "$model" == ../* ) ]] && model="$(absolute "$model")"
cd "$COMPONENT_ROOT"  # relative paths inside the configs (save_dir, resume_from) are relative to the component
main_process_port="${main_process_port:-$default_port}"
[[ "$main_process_port" =~ ^[0-9]+$ ]] || die_usage "--main-process-port must be an integer (got '$main_process_port')"

PYTHON="${PYTHON:-python3}"
ACCELERATE="${ACCELERATE:-accelerate}"
# torchrun from $PYTHON's environment unless named: the one whose torch the trainer imports
if [[ -n "${TORCHRUN:-}" ]]; then torchrun=("$TORCHRUN"); else torchrun=("$PYTHON" -m torch.distributed.run); fi
export PYTHONPATH="$COMPONENT_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the trainers import sd35zo

config_id="sd3.${profile}.${sampler}.${reward}.${loss}.${reweight}"
config_target="config/sd3_matrix.py:${config_id}"
overrides=()
if [[ "$tiny" == 1 ]]; then
  config_target="config/sd3_matrix.py:tiny:${config_id}"  # tiny rewards, 64 px, small budget (sd3_matrix.tiny)
  tiny_model="$("$PYTHON" -c "from rsm_testkit import get_tiny_model; print(get_tiny_model('sd35'))" 2>/dev/null)" \
    || { echo "run_sd3.sh: --tiny needs the test kit: pip install -e ci (rsm_testkit) into $PYTHON's environment" >&2; exit 1; }
  model="${model:-$tiny_model}"  # an explicit --model still wins
fi
[[ -n "$model" ]] && overrides+=("--config.pretrained.model=${model}")
[[ -n "$output_dir" ]] && overrides+=("--config.save_dir=${output_dir}")

# --tiny with a reward served by another process (geneval, deqa, qwenvl, unifiedreward): the test kit's
# server for it (rsm_testkit.services: the real GenEval server on the tiny detector; scoring stand-ins for the
# others) is started beside the run, unless a URL is given, and stopped when the launcher exits.
service=""
case "$reward" in geneval|deqa|qwenvl|unifiedreward) service="$reward" ;; esac
service_env="TEMPFLOW_$(printf '%s' "$service" | tr '[:lower:]' '[:upper:]')_REWARD_URL"
if [[ "$tiny" == 0 || -z "$service" || -n "${!service_env:-}" \
      || " ${trainer_args[*]-} " == *"reward_options.${service}.url"* ]]; then
  service=""
fi

world_size=$((num_processes * num_machines))
if [[ "$world_size" == 1 && -z "$accelerate_config" ]]; then
  # One process needs no launcher: the trainer's Accelerator() works without one, and a failed start ends
  # with the trainer's own one-line error instead of a launcher traceback.
  launch=("$PYTHON")
  [[ "$cpu" == 1 ]] && launch=(env ACCELERATE_USE_CPU=true "$PYTHON")
elif [[ "$cpu" == 1 ]]; then
  # `accelerate launch --cpu` ignores --num_processes (its CPU path is single-process). torchrun starts
  # the N ranks; the trainer's Accelerator() reads torchrun's RANK/WORLD_SIZE, and ACCELERATE_USE_CPU
  # keeps it off any GPU and on gloo. `env` makes the printed --dry-run line the exact command run.
  [[ -z "$accelerate_config" ]] \
    || die_usage "--accelerate-config does not apply to CPU runs on $world_size processes (they use torchrun)"
  launch=(env ACCELERATE_USE_CPU=true "${torchrun[@]}" --nnodes "$num_machines" --nproc_per_node "$num_processes")
  if [[ "$num_machines" -gt 1 ]]; then
    launch+=(--node_rank "$machine_rank" --master_addr "$main_process_ip")
  fi
  launch+=(--master_port "$main_process_port")
else
  # accelerate's --num_processes counts every machine's processes; with a config file only the flags the
  # user gave override it
  launch=("$ACCELERATE" launch)
  [[ -n "$accelerate_config" ]] && launch+=(--config_file "$accelerate_config")
  if [[ -z "$accelerate_config" || -n "$num_processes_given$num_machines_given" ]]; then
    launch+=(--num_machines "$num_machines" --num_processes "$world_size")
  fi
  if [[ "$num_machines" -gt 1 ]]; then
    launch+=(--machine_rank "$machine_rank" --main_process_ip "$main_process_ip")
  fi
  launch+=(--main_process_port "$main_process_port")
fi
command=("${launch[@]}" "$train_script" --config "$config_target" ${overrides[@]+"${overrides[@]}"}
         ${trainer_args[@]+"${trainer_args[@]}"})

echo "profile=${profile} sampler=${sampler} reward=${reward} loss=${loss} reweight=${reweight}"
echo "config_id=${config_id}"
echo "train_script=${train_script}"

# Resolve the config as each of the N processes will (overrides included) and print its epoch budget.
config_flags=()
for arg in ${overrides[@]+"${overrides[@]}"} ${trainer_args[@]+"${trainer_args[@]}"}; do
  [[ "$arg" == --config.* ]] && config_flags+=("$arg")
done
check_flags=()
[[ "$dry_run" == 1 ]] && check_flags+=(--paths-warn)  # a dry run reports missing files but still prints
# on a node other than 0 the run folder is node 0's to decide (a shared save_dir may already hold this run)
[[ "$machine_rank" != 0 ]] && check_flags+=(--skip-run-folder)
WORLD_SIZE="$world_size" "$PYTHON" -m sd35zo.config_check --config "$config_target" \
  ${config_flags[@]+"${config_flags[@]}"} ${check_flags[@]+"${check_flags[@]}"} || exit 1

print_command() {
  printf '%q' "$1"
  shift
  printf ' %q' "$@"
  printf '\n'
}
if [[ -n "$service" ]]; then
  service_command=("$PYTHON" -m rsm_testkit.services "$service" --port 0)
  url_override="--config.reward_options.${service}.url"
fi
if [[ "$dry_run" == 1 ]]; then
  if [[ "$num_machines" -gt 1 ]]; then  # every node runs the same command with its own rank
    for ((rank = 0; rank < num_machines; rank++)); do
      node=("${command[@]}")
      for ((i = 0; i < ${#node[@]}; i++)); do
        if [[ "${node[i]}" == --node_rank || "${node[i]}" == --machine_rank ]]; then node[i + 1]="$rank"; fi
      done
      printf '# node %d of %d:\n' "$rank" "$num_machines"
      print_command "${node[@]}"
    done
    exit 0
  fi
  if [[ -n "$service" ]]; then
    printf 'tiny %s server (started beside the run, its address passed as %s): ' "$service" "$url_override"
    print_command "${service_command[@]}"
  fi
  print_command "${command[@]}"
  exit 0
fi
if [[ -z "$service" ]]; then
  exec "${command[@]}"
fi

service_log="$(mktemp -t "tiny-${service}-XXXXXX.log")"
"${service_command[@]}" >"$service_log" 2>&1 &
service_pid=$!
trap 'kill "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; rm -f "$service_log"' EXIT
trap 'exit 130' INT TERM
for _ in $(seq 360); do  # the GenEval server loads its tiny detector first: up to 180 s
  address="$(sed -n 's/^listening on //p' "$service_log")"
  [[ -n "$address" ]] && break
  kill -0 "$service_pid" 2>/dev/null || break
  sleep 0.5
done
if [[ -z "${address:-}" ]]; then
  echo "run_sd3.sh: the tiny $service server did not start; its log ends:" >&2
  tail -5 "$service_log" >&2
  exit 1
fi
url="${address}$("$PYTHON" -c "import sys; from rsm_testkit.services import url_path; print(url_path(sys.argv[1]))" "$service")"
echo "tiny $service server: $url (pid $service_pid, log $service_log)"
"${command[@]}" "${url_override}=${url}"
