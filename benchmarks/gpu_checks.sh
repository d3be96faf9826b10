#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 (the default finishes in under 8 minutes):
#   suite. (the default) every stage's benchmark next to its same-run baseline at GPU sizes:
#      python benchmarks/run.py --gpu -- dataset conversion, the shard loader (and what the
#      compiled ResNet-50 step consumes, target >= 1.3x; data wait < 5%), pretraining steps
#      (ResNet-50 and ViT-S/16, bf16, channels_last, compiled) against plain timm steps,
#      fine-tuning trials packed 1/2/4/8 per GPU, the fine-tuning step against a plain smp
#      U-Net loop with the reference grid's projected GPU-hours, the sweep's overhead (needs
#      Ray: skipped here) and multi-GPU scaling (needs 2 GPUs: skipped on one). The table is
#      appended to benchmarks/RESULTS.md and the JSON written to benchmarks/results/.
# Correctness checks of the engines on CUDA, by name in SECTIONS (e.g. SECTIONS="2 3"):
#   2. the pretraining engine itself (python -m pretrain, compiled, bf16), run, then resumed;
#   3. each method (SimCLR, Barlow Twins, VICReg, BYOL) with LARS through the engine;
#   4. the DeepSpeed backend (ZeRO 2, bf16 autocast, 2 accumulated micro batches), then
#      resumed from its optimizer shards; a ViT-S/16 through the engine;
#   6. a U-Net fine-tune on CUDA (compiled, bf16, device-resident data): 3 epochs.
# The GPU image lacks webdataset, zarr, nibabel, monai, smp and DeepSpeed: pass a folder of
# their wheels as WHEELS (see benchmarks/RESULTS.md for the exact command). DALI's wheel is
# too large to carry there, so its GPU pipeline is not measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/medssl-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/medssl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
WORK=${WORK:-/tmp/medssl-gpu}
mkdir -p "$WORK"
if [[ -n "${DRY_RUN:-}" ]]; then  # on a machine without a GPU: what would run
    exec python3 benchmarks/run.py --gpu --dry-run --work "$WORK/suite"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
echo "cpus $(nproc), /dev/shm $(df -h /dev/shm | awk 'NR==2 {print $2}')"

SECTIONS=${SECTIONS:-"suite"}  # e.g. SECTIONS="suite 2 3"
if [[ "$SECTIONS" =~ [2346] ]]; then  # the engine checks share one prepared phantom
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from pretrain_throughput import make_dataset; make_dataset(Path('$WORK'), 256, 12)"
fi

[[ " $SECTIONS " == *" 2 "* ]] && {
echo "== 2. engine on CUDA: python -m pretrain (resnet18, compiled BYOL), then resume"
run=(python3 -m pretrain data.path="$WORK/prepared_256" data.batch_size=256
     data.crop_size=224 data.workers=8 data.epoch_samples=2560 model.arch=resnet18
     run.out="$WORK/engine_run" run.compile=true run.progress=false run.log_every=5)
start=$SECONDS
timeout 150 "${run[@]}" optim.epochs=2
timeout 90 "${run[@]}" optim.epochs=3
echo "engine: 3 epochs of 10 steps (2, then 1 resumed) in $((SECONDS - start)) s"
python3 - "$WORK/engine_run" <<'PY'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = Path(sys.argv[1])
events = EventAccumulator(str(run / "tensorboard")).Reload()
for tag in ("loss", "views_per_s", "data_wait_fraction"):
    name = next((t for t in events.Tags()["scalars"] if t.endswith(tag)), None)
    if name:
        values = [round(e.value, 3) for e in events.Scalars(name)]
        print(f"{name}: steps {[e.step for e in events.Scalars(name)]} values {values}")
print(json.loads((run / "export" / "backbone.json").read_text()))
PY
}

[[ " $SECTIONS " == *" 3 "* ]] && {
echo "== 3. every method on CUDA (resnet18, bf16, eager), 1 epoch of 10 steps each"
for spec in "simclr lars 0.3" "barlow_twins lars 0.2" "vicreg lars 0.3" "byol lars 0.3"; do
    read -r method optimizer lr <<<"$spec"
    start=$SECONDS
    timeout 90 python3 -m pretrain data.path="$WORK/prepared_256" data.batch_size=256 \
        data.crop_size=224 data.workers=8 data.epoch_samples=2560 model.arch=resnet18 \
        method.name="$method" optim.name="$optimizer" optim.lr="$lr" optim.epochs=1 \
        run.out="$WORK/method_$method" run.progress=false run.log_every=5 >/dev/null
    python3 - "$WORK/method_$method" "$method" "$((SECONDS - start))" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run, method, seconds = sys.argv[1:]
events = EventAccumulator(f"{run}/tensorboard").Reload()
loss = [round(e.value, 3) for e in events.Scalars("train/loss")]
speed = [round(e.value) for e in events.Scalars("perf/views_per_s")][-1]
print(f"{method:<13} loss {loss}  last views/s {speed}  ({seconds} s with start-up)")
PY
done
}

[[ " $SECTIONS " == *" 4 "* ]] && {
echo "== 4. DeepSpeed ZeRO-2 on CUDA (resnet18, bf16 autocast, grad_accum 2), then resume"
report() {
python3 - "$1" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(f"{sys.argv[1]}/tensorboard").Reload()
loss = [round(e.value, 3) for e in events.Scalars("train/loss")]
speed = [round(e.value) for e in events.Scalars("perf/views_per_s")]
print(f"{sys.argv[1]}: loss {loss} views/s {speed}")
PY
}
ds=(torchrun --nproc-per-node 1 -m pretrain data.path="$WORK/prepared_256" data.batch_size=256
    data.crop_size=224 data.workers=8 data.epoch_samples=2560 model.arch=resnet18
    run.out="$WORK/deepspeed_run" run.backend=deepspeed run.zero_stage=2 optim.grad_accum=2
    run.progress=false run.log_every=5)
start=$SECONDS
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 timeout 150 "${ds[@]}" optim.epochs=1 >"$WORK/ds1.log" 2>&1 \
    || { tail -40 "$WORK/ds1.log"; exit 1; }
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 timeout 90 "${ds[@]}" optim.epochs=2 >"$WORK/ds2.log" 2>&1 \
    || { tail -40 "$WORK/ds2.log"; exit 1; }
ls "$WORK/deepspeed_run/checkpoints"
echo "deepspeed: 2 epochs of 10 steps (1, then 1 resumed) in $((SECONDS - start)) s"
report "$WORK/deepspeed_run"
echo "== 4b. ViT-S/16 BYOL through the engine (bf16, compiled), 1 epoch of 10 steps"
start=$SECONDS
timeout 150 python3 -m pretrain data.path="$WORK/prepared_256" data.batch_size=256 \
    data.crop_size=224 data.workers=8 data.epoch_samples=2560 \
    model.arch=vit_small_patch16_224 run.compile=true optim.epochs=1 \
    run.out="$WORK/vit_run" run.progress=false run.log_every=5 >/dev/null
echo "vit: $((SECONDS - start)) s with start-up and compilation"
report "$WORK/vit_run"
}

[[ " $SECTIONS " == *" 6 "* ]] && {
echo "== 6. fine-tuning on CUDA: U-Net on resnet50, bf16, channels_last, 3 epochs"
start=$SECONDS
timeout 240 python3 -m finetune train --data "$WORK/prepared_256" --out "$WORK/finetune" \
    --arch resnet50 --init random --budget 0 --seed 0 epochs=3 batch_size=64 \
    warmup_epochs=0.5 lr=1e-3 progress=false overlays=2 >/dev/null
python3 - "$WORK/finetune" "$((SECONDS - start))" <<'PY'
import json, sys
metrics = json.loads(open(f"{sys.argv[1]}/metrics.json").read())
for e in metrics["epochs"]:
    print(f"epoch {e['epoch']}: loss {e['train_loss']:.3f} val Dice {e['val_dice']:.3f} "
          f"{e['train_images_per_s']:.0f} images/s")
print(f"test {metrics['test']['dice']}, {sys.argv[2]} s with start-up")
PY
}
[[ " $SECTIONS " == *" suite "* ]] && {
echo "== suite: every stage's benchmark at GPU sizes (python benchmarks/run.py --gpu)"
timeout 470 python3 benchmarks/run.py --gpu --work "$WORK/suite" || true
}
exit 0
