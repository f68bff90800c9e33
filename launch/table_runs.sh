# Shared by reproduce_table.sh and reproduce_table.sbatch (sourced): the runs of the paper's table, one per width.
#   TABLE_WIDTHS         from WIDTHS (default "1x 0.5x 0.25x"); the job array's index picks one of them
#   TABLE_DIR            every run's train.output_dir (default checkpoints/table): the table reads this folder
#   TABLE_EXPERIMENT     experiment file per width, {width} replaced (default the paper's recipe,
#                        configs/experiments/{width}-FDMobileNet-224.yaml); the label is the file's name
#   table_run_args WIDTH sets RUN_ARGS, the train_ddp.py arguments of that width's run
read -r -a TABLE_WIDTHS <<< "${WIDTHS:-1x 0.5x 0.25x}"
TABLE_DIR=${TABLE_DIR:-checkpoints/table}
if [[ -z ${TABLE_EXPERIMENT:-} ]]; then TABLE_EXPERIMENT='configs/experiments/{width}-FDMobileNet-224.yaml'; fi

table_run_args() {
  local config=${TABLE_EXPERIMENT//\{width\}/$1}
  if [[ ! -f $config ]]; then
    echo "reproduce_table: width $1: experiment file $config not found (TABLE_EXPERIMENT=$TABLE_EXPERIMENT)" >&2
    return 2
  fi
  RUN_ARGS=(--config "$config" --label "$(basename "$config" .yaml)" "train.output_dir=$TABLE_DIR")
}
