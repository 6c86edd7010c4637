#!/usr/bin/env python3
"""Training recipes against separately trained ViTs on the bundled digits, several seeds each; resumable.

    python scripts/compare_recipes.py                      # every recipe x seeds 0 1 2, then the report
    python scripts/compare_recipes.py --recipes paper_uniform sandwich_ikd --seeds 0
    python scripts/compare_recipes.py --report-only        # tables and plot from the runs done so far
    python scripts/compare_recipes.py --list               # the plan: recipes, flags, what is done
    python scripts/compare_recipes.py --report-only --update-docs   # and the tables in README, docs/training.md

Every (recipe, seed) is one ``python -m hydravit.train`` run of configs/digits.yaml plus the recipe's flags, in
RUNS/RECIPE/seedS. A run that finished (``result.json``) is skipped; one that stopped part-way continues from its
``last.pth.tar`` with ``--resume`` (exact), so the script can be killed and restarted at any time. After each
run the report is rewritten: REPORT/comparison.csv (one row per run), REPORT/comparison.md (per-k mean +- std
over seeds, model and EMA), REPORT/comparison.png (top-1 against k per recipe, with the dedicated ViTs).

Compute: a recipe's cost is counted in subnetwork forward/backward passes (optimizer steps x subnetworks per
step), read from the run's own head-sampler counts. Multi-subnetwork recipes at equal compute train for
proportionally fewer epochs (``equal compute`` rows); ``equal epochs`` rows spend N times the compute. Since a
k = 3 pass costs about a tenth of a k = 12 pass, the report also gives training GMACs: per pass, the subnetwork's
forward GMACs per image (the evaluation core's DeepSpeed count) x images x 3 (forward + backward), summed over the
run's passes per k, plus a teacher's forwards (x 1). Rows recorded before the per-k counts were kept get the
expected value from their sampler's distribution. A converted entry (``hydravit.convert`` of the dedicated 12-head
run of the same seed, then a fine-tune) also counts its source's training and the conversion's calibration passes.
The CSV keeps each run's ``train_gmacs`` (and a source entry's ``source_gmacs``), so budgets can be checked from it
alone, and a source entry's ``source_top1_k12``, the top-1 of the weights it started from (the base may be retrained
later, replacing its own row), so that k = 12 is also compared with the run's own source, paired per seed. Entries
planned within a budget (``GOALS``: from scratch, at most the dedicated 12-head ViT's training GMACs; from that
trained ViT, at most half of its GMACs beyond it) are run by name; ``--list`` gives every entry's expected
training GMACs (the trainer's own sampler settings, a teacher forward every step, the source) against both.
"""
import argparse
import csv
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
CONFIG = 'configs/digits.yaml'
MODEL = 'hydravit_dyn_patch4_32'
HEADS = list(range(3, 13))
UNIFORM = ['--weights'] + ['1'] * len(HEADS)
BASE_EPOCHS = 40  # configs/digits.yaml
SOURCE_TOP1 = 'source_top1_k12'  # a source entry's row: the top-1 of the very weights it started from


@dataclass
class Recipe:
    name: str
    description: str
    flags: List[str] = field(default_factory=list)
    epochs: int = BASE_EPOCHS
    dedicated: Optional[int] = None  # a separately trained ViT of exactly this many heads
    teacher: bool = False  # distils from the dedicated 12-head ViT (``base``) of the same seed
    source: bool = False  # starts from the dedicated 12-head ViT (``base``) of the same seed (its EMA weights)
    convert: Optional[List[str]] = None  # hydravit.convert flags; a source recipe without them keeps its order
    base: str = 'dedicated_k12'  # the dedicated 12-head entry a teacher or source recipe uses
    goal: Optional[str] = None  # the training-compute budget it is planned to fit: a key of GOALS

    @property
    def needs_k12(self) -> bool:
        return self.teacher or self.source

    @property
    def baseline(self) -> bool:
        """A dedicated ViT of the full schedule: what the targets compare against (shorter ones are sources)."""
        return self.dedicated is not None and self.epochs == BASE_EPOCHS

    def train_flags(self) -> List[str]:
        flags = list(self.flags) + ['--epochs', str(self.epochs), '--eval-interval', str(self.epochs)]
        if self.dedicated is not None:
            k = self.dedicated
            flags += ['--heads', str(k), '--weights', '1', *width_flags(k)]
        return flags


def width_flags(k: int) -> List[str]:
    """``--model-kwargs`` that build MODEL as a ViT of ``k`` heads of 16 (a dedicated entry's geometry)."""
    return ['--model-kwargs', f'embed_dim={16 * k}', f'num_heads={k}']


SANDWICH = ['--subnets-per-step', '4', '--subnet-policy', 'sandwich'] + UNIFORM
SANDWICH_IKD = SANDWICH + ['--inplace-kd']
CONVERT = ['--score', 'magnitude', '--calib-images', '256']  # zero-shot best on seed 0 (docs/training.md)
FINE_TUNE_EPOCHS = (5, 10, 20)
BATCH_SIZE = 16  # configs/digits.yaml: images per subnetwork pass
STEPS_PER_EPOCH = 84  # the digits' 1,347 training images in batches of 16, the last partial one dropped
# Training-compute budgets: 'scratch' = the whole run (a source trained for it included) at most this multiple of
# the dedicated 12-head ViT's training GMACs; 'vit' = from the trained dedicated 12-head ViT, at most this multiple of
# the source's training GMACs spent beyond it (fine-tune, teacher forwards and the conversion's calibration).
GOALS = {'scratch': 1.0, 'vit': 0.5}
GOAL_NAMES = {'scratch': 'scratch', 'vit': 'from ViT'}
RECIPES = {r.name: r for r in [
    Recipe('dedicated_k12', 'separately trained ViT, 12 heads (the teacher of *_teacher)', dedicated=12),
    Recipe('paper_uniform', 'paper: one k per step, uniform', UNIFORM),
    Recipe('paper_weighted', 'paper: one k per step, weights ~ k (configs/digits.yaml, the demo)'),
    Recipe('sandwich', 'sandwich, 4 subnetworks per step, equal compute', SANDWICH, epochs=BASE_EPOCHS // 4),
    Recipe('sandwich_ikd', 'sandwich + in-place KD, 4 per step, equal compute', SANDWICH_IKD,
           epochs=BASE_EPOCHS // 4),
    Recipe('sandwich_ikd_teacher', 'sandwich + in-place KD + dedicated 12-head ViT teacher, equal compute',
           SANDWICH_IKD, epochs=BASE_EPOCHS // 4, teacher=True),
    Recipe('dedicated_k3', 'separately trained ViT, 3 heads', dedicated=3),
    Recipe('dedicated_k6', 'separately trained ViT, 6 heads', dedicated=6),
    Recipe('dedicated_k9', 'separately trained ViT, 9 heads', dedicated=9),
    Recipe('sandwich_e40', 'sandwich, 4 per step, equal epochs (4x compute)', SANDWICH, epochs=BASE_EPOCHS),
    Recipe('sandwich_ikd_e40', 'sandwich + in-place KD, 4 per step, equal epochs (4x compute)',
           SANDWICH_IKD, epochs=BASE_EPOCHS),
    Recipe('convert_ft0', 'dedicated 12-head ViT converted (magnitude order), no fine-tuning', epochs=0,
           source=True, convert=CONVERT),
    *(Recipe(f'convert_ft{e}', f'converted (magnitude order), then sandwich of 4 for {e} epochs', SANDWICH, epochs=e,
             source=True, convert=CONVERT) for e in FINE_TUNE_EPOCHS),
    Recipe('source_ft10', 'dedicated 12-head ViT in its own order, sandwich of 4 for 10 epochs (ablation)', SANDWICH,
           epochs=10, source=True),
    # planned within a budget of GOALS; epochs chosen from expected_gmacs (--list shows the figures)
    Recipe('sandwich_e20', 'sandwich, 4 per step, 20 epochs (half of sandwich_e40)', SANDWICH, epochs=20,
           goal='scratch'),
    Recipe('sandwich3_ikd_e25', 'sandwich of 3 (k = 12, 3 and one drawn of 4..11) + in-place KD, 25 epochs',
           ['--subnets-per-step', '3', '--subnet-policy', 'sandwich', *UNIFORM, '--inplace-kd'], epochs=25,
           goal='scratch'),
    Recipe('largest2_ikd_e28', 'k = 12 and one drawn k of 3..11 per step (--subnet-policy largest) + in-place KD, '
           '28 epochs', ['--subnets-per-step', '2', '--subnet-policy', 'largest', *UNIFORM, '--inplace-kd'],
           epochs=28, goal='scratch'),
    Recipe('warmup18_ikd_e28', 'k = 12 alone for 18 epochs, then sandwich of 4 + in-place KD for 10, in one run '
           '(progressive shrinking without the reorder)', SANDWICH_IKD + ['--full-warmup-epochs', '18'], epochs=28,
           goal='scratch'),
    # chosen after looking at the entries above (docs/training.md): sandwich_e20 at twice the learning rate, then, as
    # that was worse, at half of it; the sandwich of 3 without in-place KD, which lowered k = 12 at 40 epochs
    Recipe('sandwich_e20_lr2e3', 'sandwich, 4 per step, 20 epochs at twice the learning rate (2e-3): every step is '
           'clipped and AdamW moves each weight by about the learning rate per step, so half the steps take twice the '
           'step', SANDWICH + ['--lr', '2e-3'], epochs=20, goal='scratch'),
    Recipe('sandwich3_e25', 'sandwich of 3 (k = 12, 3 and one drawn of 4..11), 25 epochs',
           ['--subnets-per-step', '3', '--subnet-policy', 'sandwich', *UNIFORM], epochs=25, goal='scratch'),
    Recipe('sandwich_e20_lr5e4', 'sandwich, 4 per step, 20 epochs at half the learning rate (5e-4)',
           SANDWICH + ['--lr', '5e-4'], epochs=20, goal='scratch'),
    Recipe('dedicated_k12_e18', 'separately trained ViT, 12 heads, 18 epochs (the source of shrink18_ikd_ft10)',
           dedicated=12, epochs=18),
    Recipe('shrink18_ikd_ft10', 'dedicated_k12_e18 converted (magnitude order), then sandwich of 4 + in-place KD '
           'for 10 epochs (progressive shrinking as Once-for-All)', SANDWICH_IKD, epochs=10, source=True,
           convert=CONVERT, base='dedicated_k12_e18', goal='scratch'),
    # chosen after looking: shrink18_ikd_ft10 came closest; a shorter full-width phase leaves the sandwich more of the
    # budget, and without in-place KD (see above)
    Recipe('dedicated_k12_e12', 'separately trained ViT, 12 heads, 12 epochs (the source of shrink12_ft13)',
           dedicated=12, epochs=12),
    Recipe('shrink12_ft13', 'dedicated_k12_e12 converted (magnitude order), then sandwich of 4 for 13 epochs '
           '(progressive shrinking, no KD)', SANDWICH, epochs=13, source=True, convert=CONVERT,
           base='dedicated_k12_e12', goal='scratch'),
    # chosen after looking at all of the above: every entry that started from a trained ViT met k = 3 far better than
    # those from scratch, and on the digits the dedicated 6-head ViT is as accurate as the 12-head one at a quarter of
    # its GMACs; grown to 12 heads it leaves most of the budget to the sandwich
    Recipe('grow6_ft14', 'dedicated_k6 converted (magnitude order) and grown to 12 heads (hydravit.convert '
           '--grow-heads: the rest newly initialized), then sandwich of 4 for 14 epochs (progressive growing)',
           SANDWICH, epochs=14, source=True, convert=CONVERT + ['--grow-heads', '12'], base='dedicated_k6',
           goal='scratch'),
    Recipe('convert_ft8_teacher', 'converted (magnitude order), then sandwich of 4 for 8 epochs, every k distilled '
           'from the frozen source', SANDWICH, epochs=8, teacher=True, source=True, convert=CONVERT, goal='vit'),
    Recipe('convert_ft10_ikd', "converted (magnitude order), then sandwich of 4 + in-place KD from the step's k = 12 "
           'for 10 epochs', SANDWICH_IKD, epochs=10, source=True, convert=CONVERT, goal='vit'),
    Recipe('convert_ft10_lr3e4', 'converted (magnitude order), then sandwich of 4 at a third of the learning rate '
           '(3e-4) for 10 epochs', SANDWICH + ['--lr', '3e-4'], epochs=10, source=True, convert=CONVERT, goal='vit'),
]}
# entries a user can run as they are: (config, make target or None); tests/test_compare_recipes.py ties each config to
# its entry's flags and each target to its config
DEMOS = {'sandwich_e40': ('configs/digits_plus.yaml', 'make demo-plus'),
         'convert_ft10': ('configs/digits_convert.yaml', 'make demo-convert'),
         'convert_ft10_ikd': ('configs/digits_convert_ikd.yaml', 'make demo-convert-ikd'),
         'convert_ft8_teacher': ('configs/digits_convert_teacher.yaml', 'make demo-convert-teacher'),
         'warmup18_ikd_e28': ('configs/digits_warmup.yaml', None),
         'grow6_ft14': ('configs/digits_grow.yaml', 'make demo-grow')}
# the comparison's original set; sandwich_e40 and the source and budget entries are run by name (--recipes)
DEFAULT_RECIPES = [name for name, r in RECIPES.items() if not name.endswith('_e40') and not r.source
                   and r.goal is None and (r.dedicated is None or r.baseline)]


def run_dir(runs: Path, recipe: str, seed: int) -> Path:
    return runs / recipe / f'seed{seed}'


def teacher_file(runs: Path, seed: int, base: str = 'dedicated_k12') -> Path:
    """The EMA weights of the dedicated run ``base`` of this seed: a teacher, or a source to start from."""
    return run_dir(runs, base, seed) / 'teacher_ema.safetensors'


def teacher_flags(checkpoint: Path) -> List[str]:
    """hydravit.train's flags for distilling from the dedicated 12-head ViT whose weights are ``checkpoint``."""
    return ['--teacher', MODEL, '--teacher-checkpoint', str(checkpoint), '--teacher-kwargs', 'num_classes=10',
            '--teacher-heads', '12']


def command(recipe: Recipe, seed: int, data: Path, runs: Path) -> List[str]:
    out = run_dir(runs, recipe.name, seed)
    cmd = [sys.executable, '-m', 'hydravit.train', str(data), '--config', CONFIG, '--device', 'cpu',
           '--seed', str(seed), '--output', str(out.parent), '--experiment', out.name, '--checkpoint-hist', '1',
           *recipe.train_flags()]
    if recipe.source:
        start = out / 'converted.pth' if recipe.convert is not None else teacher_file(runs, seed, recipe.base)
        cmd += ['--initial-checkpoint', str(start)]
    if recipe.teacher:
        cmd += teacher_flags(teacher_file(runs, seed, recipe.base))
    if (out / 'last.pth.tar').is_file() and not (out / 'result.json').is_file():
        cmd += ['--resume', str(out / 'last.pth.tar')]  # continue a run that stopped part-way
    return cmd


def run_one(recipe: Recipe, seed: int, data: Path, runs: Path, threads: int) -> dict:
    """Train (or continue) one run; returns its result row, also saved as result.json."""
    out = run_dir(runs, recipe.name, seed)
    if (out / 'result.json').is_file():  # recorded, trained again (a teacher whose weights are not here)
        for path in out.iterdir():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    while recipe.needs_k12 and not teacher_file(runs, seed, recipe.base).is_file():
        time.sleep(10)  # the dedicated 12-head run of this seed, started earlier, is still training
    wall = cpu = 0.
    if recipe.convert is not None and not (out / 'converted.pth').is_file():
        wall, cpu = run_logged(convert_command(recipe, seed, data, runs), out / 'train.log', threads, recipe, seed)
    cmd = command(recipe, seed, data, runs) if recipe.epochs else validate_command(out, data)
    print(f'[compare] start {recipe.name} seed {seed}: {" ".join(cmd[1:])}', flush=True)
    more_wall, more_cpu = run_logged(cmd, out / 'train.log', threads, recipe, seed)
    if recipe.epochs:
        row = collect_result(recipe, seed, out, wall + more_wall, cpu + more_cpu)
    else:
        row = collect_validation(recipe, seed, out, wall + more_wall, cpu + more_cpu)
    row['threads'] = threads
    row['resumed'] = int('--resume' in cmd)  # its times cover the last part only
    if recipe.source:
        row.update(source_accuracy(runs, seed, recipe.base))
    from hydravit.checkpoint import write_json  # here: the plan and the report need no torch
    write_json(out / 'result.json', row, indent=1)  # a NaN as null: valid JSON
    tidy_run(recipe, out, runs, seed)
    return row


def source_accuracy(runs: Path, seed: int, base: str) -> dict:
    """``{'source_top1_k12': ...}``: the top-1 of the weights a source entry starts from (the EMA of its ``base`` run
    of this seed), kept in its own row, since a later retrain of the base replaces the base's row; ``{}`` when the
    base's result is not on this machine (unknown rather than guessed)."""
    path = run_dir(runs, base, seed) / 'result.json'
    if not path.is_file() or RECIPES[base].dedicated != HEADS[-1]:  # a narrower source (grown) has no k = 12
        return {}
    return {SOURCE_TOP1: json.loads(path.read_text())['ema_top1_k12']}


def run_logged(cmd: List[str], log_path: Path, threads: int, recipe: Recipe, seed: int) -> tuple:
    """Run ``cmd`` with its output appended to ``log_path``; ``(wall, CPU)`` seconds of that child alone."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR='cpu')
    start = time.time()
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, even with runs side by side
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f'[compare] {recipe.name} seed {seed} failed (exit {rc}); see {log_path}')
    return time.time() - start, usage.ru_utime + usage.ru_stime


def convert_command(recipe: Recipe, seed: int, data: Path, runs: Path) -> List[str]:
    """hydravit.convert of the dedicated run ``base``'s EMA weights of this seed, calibrated on its train split."""
    k = RECIPES[recipe.base].dedicated
    width = width_flags(k) if k != HEADS[-1] else []
    return [sys.executable, '-m', 'hydravit.convert', str(data), '--model', MODEL, *width, '--checkpoint',
            str(teacher_file(runs, seed, recipe.base)), '--num-classes', '10', '--seed', str(seed),
            '-o', str(run_dir(runs, recipe.name, seed) / 'converted.pth'), *recipe.convert]


def validate_command(out: Path, data: Path) -> List[str]:
    """A 0-epoch entry: the converted checkpoint validated at every k (what it gives without training)."""
    return [sys.executable, 'validate.py', str(data), '--model', MODEL, '--checkpoint', str(out / 'converted.pth'),
            '--num-classes', '10', '--heads', *map(str, HEADS), '-b', '150', '--workers', '0',
            '--results-file', str(out / 'validate.json')]


def collect_validation(recipe: Recipe, seed: int, out: Path, wall_s: float, cpu_s: float) -> dict:
    rows = json.loads((out / 'validate.json').read_text())  # validate.py: a list of per-k objects
    row = {'recipe': recipe.name, 'seed': seed, 'epochs': 0, 'subnet_passes': 0, 'passes_per_k': '',
           'wall_s': round(wall_s, 1), 'cpu_s': round(cpu_s, 1), 'train_s': 0.0, 'commit': git_commit()}
    for r in rows:
        row[f'top1_k{int(r["heads"])}'] = round(float(r['top1']), 3)
        row[f'ema_top1_k{int(r["heads"])}'] = round(float(r['top1']), 3)  # one set of weights: no EMA
    return row


def collect_result(recipe: Recipe, seed: int, out: Path, wall_s: float, cpu_s: float) -> dict:
    """Final per-k top-1 (model and EMA) from summary.csv, passes from the checkpoint's sampler counts."""
    import torch  # only once a run has finished: the plan and the report need no torch

    with open(out / 'summary.csv') as f:
        last = list(csv.DictReader(f))[-1]
    checkpoint = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    passes = int(sum(checkpoint['sampler']['counts']))
    heads = [recipe.dedicated] if recipe.dedicated is not None else HEADS
    per_k = ' '.join(f'{k}:{n}' for k, n in zip(heads, checkpoint['sampler']['counts'], strict=True))
    row = {'recipe': recipe.name, 'seed': seed, 'epochs': recipe.epochs, 'subnet_passes': passes,
           'passes_per_k': per_k,
           'teacher_forwards': int(checkpoint['epoch'] + 1) * steps_per_epoch(out) if recipe.teacher else 0,
           'wall_s': round(wall_s, 1), 'cpu_s': round(cpu_s, 1), 'train_s': training_seconds(out / 'train.log'),
           'commit': git_commit()}
    for k in heads:
        row[f'top1_k{k}'] = round(float(last[f'eval_top1_k{k}']), 3)
        row[f'ema_top1_k{k}'] = round(float(last[f'eval_ema_top1_k{k}']), 3)
    return row


EPOCH_DONE = re.compile(r'^Epoch (\d+) done in (\d+):(\d\d):(\d\d)', re.MULTILINE)


def training_seconds(log: Path) -> float:
    """Wall time of the training epochs, from the log's ``Epoch N done in H:MM:SS`` lines. An epoch that a
    stopped run had finished before a resume is counted once (its last line), so resumed runs have a time too."""
    epochs = {int(m[1]): int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4]) for m in EPOCH_DONE.finditer(log.read_text())}
    return float(sum(epochs.values()))


def steps_per_epoch(out: Path) -> int:
    for line in (out / 'train.log').read_text().splitlines():
        if ' epochs of ' in line and ' optimizer steps' in line:
            return int(line.split(' epochs of ')[1].split()[0])
    return 0


def tidy_run(recipe: Recipe, out: Path, runs: Path, seed: int) -> None:
    """Keep last.pth.tar (and the teacher's EMA weights); the other checkpoints are not needed."""
    for path in list(out.glob('checkpoint-*.pth.tar')) + [out / 'model_best.pth.tar']:
        path.unlink(missing_ok=True)
    if recipe.dedicated is not None:  # a teacher or source of other entries
        from safetensors.torch import save_file

        from hydravit.checkpoint import extract_state_dict, load_checkpoint_file

        # the shared reader: prefixes stripped, and NaN / inf EMA weights refused rather than made a teacher
        path = out / 'last.pth.tar'
        state = extract_state_dict(load_checkpoint_file(path), use_ema=True, source=str(path))
        save_file({k: v.contiguous() for k, v in state.items()}, teacher_file(runs, seed, recipe.name))


def git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ''


# --- compute in GMACs -----------------------------------------------------------------------------------------
_GMACS: dict = {}


def forward_gmacs() -> dict:
    """Forward GMACs per image of every k of the digits model (the evaluation core's DeepSpeed count)."""
    if not _GMACS:
        import timm

        import hydravit  # noqa: F401  registers the models
        from hydravit.evaluation.macs import profile_heads
        model = timm.create_model(MODEL, num_classes=10).eval()
        _GMACS.update({k: profile_heads(model, k, (3, 32, 32))['gmacs'] for k in HEADS})
    return _GMACS


@functools.cache
def trainer_args(name: str) -> argparse.Namespace:
    """hydravit.train's settings for a run of recipe ``name`` (configs/digits.yaml and the recipe's flags), parsed by
    the trainer itself: the sampler, warm-up and epochs its expected compute is planned from."""
    from hydravit.training.config import parse_args  # torch: only where compute is planned or counted

    args, _ = parse_args(['data', '--config', str(ROOT / CONFIG), *RECIPES[name].train_flags()])
    return args


def step_inclusion(args: argparse.Namespace) -> Dict[int, float]:
    """{k: probability that one optimizer step trains k} under the trainer's sampler settings ``args`` (heads,
    weights, subnets_per_step, subnet_policy; ``HeadSampler.draw_step``), for the steps after any full-width warm-up.
    The values sum to the subnetworks per step."""
    from hydravit.training.sampler import normalize_weights, split_strata

    heads, num = list(args.heads), args.subnets_per_step
    probs = dict(zip(heads, normalize_weights(args.weights, len(heads)), strict=True))
    if num == 1:  # the paper's step: one weighted draw
        return probs
    if args.subnet_policy == 'random':
        return _drawn(probs, num)
    if args.subnet_policy == 'largest':
        return {max(heads): 1.0, **_drawn({k: p for k, p in probs.items() if k != max(heads)}, num - 1)}
    ends = [max(heads), min(heads)][:num]
    middle = sorted(k for k in heads if k not in ends)
    included = dict.fromkeys(ends, 1.0)
    if args.subnet_policy == 'sandwich':
        return {**included, **_drawn({k: probs[k] for k in middle}, num - len(ends))}
    for stratum in split_strata(middle, num - len(ends)):  # stratified: one weighted draw from each stratum
        total = sum(probs[k] for k in stratum)
        included.update({k: probs[k] / total for k in stratum})
    return included


def _drawn(probs: Dict[int, float], num: int) -> Dict[int, float]:
    """{k: probability that k is among ``num`` weighted draws without replacement}: each draw picks k with its
    weight renormalized over the head counts not drawn yet (torch.multinomial without replacement)."""
    included = dict.fromkeys(probs, 0.0)
    total = sum(probs.values())
    if num <= 0 or total <= 0:
        return included
    for k, p in probs.items():
        if p > 0:
            included[k] += p / total
            for j, q in _drawn({j: w for j, w in probs.items() if j != k}, num - 1).items():
                included[j] += p / total * q
    return included


def expected_passes(recipe: Recipe) -> Dict[int, float]:
    """{k: expected subnetwork passes} of one run of ``recipe`` (its own run; a source's is not included): the
    full-width warm-up epochs train the largest k alone, the other steps draw as ``step_inclusion`` says."""
    if not recipe.epochs:  # validated only
        return {}
    args = trainer_args(recipe.name)
    warm = min(args.full_warmup_epochs, args.epochs)
    passes = {k: (args.epochs - warm) * STEPS_PER_EPOCH * p for k, p in step_inclusion(args).items()}
    passes[max(args.heads)] += warm * STEPS_PER_EPOCH
    return passes


def recorded_passes(row: dict) -> Dict[int, float]:
    """{k: passes} of a recorded run: its per-k counts, or for rows recorded before those were kept, its number of
    passes spread over k as its sampler is expected to."""
    if row.get('passes_per_k'):
        return {int(k): int(n) for k, n in (item.split(':') for item in str(row['passes_per_k']).split())}
    expected = expected_passes(RECIPES[row['recipe']])
    total = sum(expected.values())
    return {k: row['subnet_passes'] * n / total for k, n in expected.items()} if total else {}


def passes_gmacs(passes: Dict[int, float], teacher_forwards: float, gmacs: dict) -> float:
    """Training GMACs of subnetwork passes {k: count} (forward + backward: x 3) and of a 12-head teacher's
    forwards (x 1), each on a batch of BATCH_SIZE images; ``gmacs``: forward GMACs per image of each k."""
    return (3 * sum(n * gmacs[k] for k, n in passes.items()) + teacher_forwards * gmacs[HEADS[-1]]) * BATCH_SIZE


def conversion_gmacs(recipe: Recipe, gmacs: dict) -> float:
    """hydravit.convert's calibration: forwards at full width (the full-width check), + backward for taylor."""
    if recipe.convert is None:
        return 0.0
    calib = int(recipe.convert[recipe.convert.index('--calib-images') + 1])
    return calib * (3 if 'taylor' in recipe.convert else 1) * gmacs[HEADS[-1]]


def training_gmacs(row: dict, rows: List[dict]) -> float:
    """Training GMACs of one run: its passes, a teacher's forwards, and for a source entry the source run of the same
    seed (``source_gmacs``) plus the conversion's calibration passes."""
    recipe, gmacs = RECIPES[row['recipe']], forward_gmacs()
    total = passes_gmacs(recorded_passes(row), row.get('teacher_forwards', 0), gmacs)
    if recipe.source:
        total += source_gmacs(row, rows) + conversion_gmacs(recipe, gmacs)
    return total


def source_gmacs(row: dict, rows: List[dict]) -> float:
    """Training GMACs of the run a source entry started from (its ``base``, same seed); NaN when that run is not
    among ``rows`` (reported as unknown rather than as cheap)."""
    base = RECIPES[row['recipe']].base
    source = [r for r in rows if r['recipe'] == base and r['seed'] == row['seed']]
    return training_gmacs(source[0], rows) if source else float('nan')


def expected_gmacs(recipe: Recipe) -> Tuple[float, float]:
    """(training GMACs, of which its source's) that a run of ``recipe`` is expected to spend: ``training_gmacs``
    of the passes its sampler is expected to draw, with a teacher forward every optimizer step."""
    gmacs = forward_gmacs()
    teacher = recipe.epochs * STEPS_PER_EPOCH if recipe.teacher else 0
    total = passes_gmacs(expected_passes(recipe), teacher, gmacs)
    if not recipe.source:
        return total, 0.0
    source = expected_gmacs(RECIPES[recipe.base])[0]
    return total + source + conversion_gmacs(recipe, gmacs), source


def goal_ratio(goal: str, total: float, source: float, k12: float) -> float:
    """What ``GOALS[goal]`` bounds: training GMACs over the dedicated 12-head ViT's ``k12`` ('scratch'), or the GMACs
    spent beyond the source over the source's ('vit')."""
    return (total - source) / source if goal == 'vit' else total / k12


def plan_text(recipe: Recipe) -> str:
    """--list's compute column: expected training GMACs, against the dedicated 12-head ViT's and (source entries)
    beyond the source, and whether a budgeted entry fits its goal."""
    total, source = expected_gmacs(recipe)
    k12 = expected_gmacs(RECIPES['dedicated_k12'])[0]
    text = f'{total:>7,.0f} GMACs = {total / k12:.2f}x k=12'
    if recipe.source:
        text += f', {(total - source) / source:.2f}x beyond source'
    if recipe.goal is not None:
        fits = goal_ratio(recipe.goal, total, source, k12) <= GOALS[recipe.goal]
        text += f' [{recipe.goal} <= {GOALS[recipe.goal]}x: {"fits" if fits else "OVER"}]'
    return text


def _gmacs_text(values: Sequence[float]) -> str:
    mean = statistics.mean(values) if values else math.nan
    return f'{mean:,.0f}' if math.isfinite(mean) else ''  # unknown (no source run recorded): blank, not 'nan'


# --- report ------------------------------------------------------------------------------------------------
def load_results(runs: Path, report: Path) -> List[dict]:
    """Finished runs: the run folders' result.json, plus the rows of an earlier report (committed, so that a
    later session on another machine continues the comparison instead of repeating it)."""
    from hydravit.evaluation.common import read_results

    rows = {}
    if (report / 'comparison.csv').is_file():
        for row in read_results(report / 'comparison.csv'):
            row = {k: v for k, v in row.items() if v is not None}
            rows[(row['recipe'], row['seed'])] = row
    for name in RECIPES:
        for path in sorted((runs / name).glob('seed*/result.json')):
            row = json.loads(path.read_text())
            rows[(row['recipe'], row['seed'])] = row
    unknown = sorted({name for name, _ in rows} - set(RECIPES))
    if unknown:  # a newer script's entries: rewriting the report without them would drop their runs
        raise SystemExit(f"{report / 'comparison.csv'} has runs of entries this script does not define: "
                         f"{', '.join(unknown)} (written by a newer version of it?)")
    for (name, seed), row in rows.items():  # rows recorded before train_s existed, where the log is here
        log = run_dir(runs, name, seed) / 'train.log'
        if 'train_s' not in row and log.is_file():
            row['train_s'] = training_seconds(log)
    return [rows[key] for key in sorted(rows, key=lambda key: (list(RECIPES).index(key[0]), key[1]))
            if key[0] in RECIPES]


def mean_std(values: Sequence[float]) -> str:
    """Mean +- sample std; one value has no spread to show, only its mean."""
    if not values:
        return ''
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def summarize(rows: List[dict], prefix: str) -> List[dict]:
    """One line per recipe: per-k mean +- std of ``prefix``top1_kK over seeds, seeds, passes, wall time."""
    lines = []
    for name, recipe in RECIPES.items():
        runs = [r for r in rows if r['recipe'] == name]
        if not runs:
            continue
        timed = [r for r in runs if not r.get('resumed')]
        line = {'recipe': name, 'seeds': len(runs), 'epochs': recipe.epochs,
                'passes': int(statistics.mean(r['subnet_passes'] for r in runs)),
                'gmacs': _gmacs_text([training_gmacs(r, rows) for r in runs]),
                'train_min': _minutes([r['train_s'] for r in runs if 'train_s' in r]),
                'wall_min': _minutes([r['wall_s'] for r in timed]), 'cpu_min': _minutes([r['cpu_s'] for r in timed])}
        for k in HEADS:
            line[k] = mean_std([r[f'{prefix}top1_k{k}'] for r in runs if f'{prefix}top1_k{k}' in r])
        lines.append(line)
    return lines


def _minutes(seconds: Sequence[float]) -> str:
    return f'{statistics.mean(seconds) / 60:.1f}' if seconds else ''


def pipe_table(head: Sequence[str], body: Sequence[Sequence]) -> str:
    """A markdown table: the header, its rule and one line per row of cells."""
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in cells) + ' |' for cells in body])


def markdown_table(lines: List[dict], title: str) -> str:
    columns = ['recipe', 'seeds', 'epochs', 'passes', 'gmacs', 'train_min', 'wall_min', 'cpu_min', *HEADS]
    head = ['recipe', 'seeds', 'epochs', 'passes', 'train GMACs', 'train (min)', 'wall (min)', 'CPU (min)'] + \
        [f'k={k}' for k in HEADS]
    return f'**{title}**\n\n' + pipe_table(head, [[line[c] for c in columns] for line in lines])


def write_report(rows: List[dict], report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    # recomputed every time: a figure that became unknown must not keep an earlier value
    rows_out = [{**{k: v for k, v in row.items() if k not in ('train_gmacs', 'source_gmacs')},
                 **gmacs_columns(row, rows)} for row in rows]
    keys = sorted({key for row in rows_out for key in row}, key=_column_order)
    with open(report / 'comparison.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows_out)
    text = ['# Recipe comparison on digits (generated by scripts/compare_recipes.py)', '',
            'Top-1 (%) on the 450 validation images, mean ± std over seeds; passes = subnetwork forward/backward '
            'passes per run; train GMACs = forward GMACs per image of each pass x 16 images x 3 (forward + backward), '
            'summed over the run, with a teacher\'s forwards and, for converted entries, the source run and the '
            'calibration (rows without per-k counts: the expected value of their sampler); train = wall time of the '
            'training epochs (sum of the logged epoch times, every run); '
            "wall and CPU = the whole run's process (startup and validation included; runs that were interrupted and "
            'resumed are left out of these two columns). Runs went two at a time with one thread each on the 2-core '
            'CPU, at times beside other work: the times grow with the load of the machine (the same recipe took 8 to '
            '19 CPU minutes), so the passes are the measure of compute.', '',
            markdown_table(summarize(rows, ''), 'model'), '', markdown_table(summarize(rows, 'ema_'), 'EMA'), '',
            targets_table(rows), '', source_table(rows), '',
            '![worst target margin against training GMACs](comparison_cost.png)', '']
    (report / 'comparison.md').write_text('\n'.join(text))
    plot(rows, report / 'comparison.png')
    plot_cost(rows, report / 'comparison_cost.png')


def gmacs_columns(row: dict, rows: List[dict]) -> dict:
    """The CSV's compute columns of one run, so that budgets can be checked from the CSV alone: ``train_gmacs``
    (``training_gmacs``: a source entry's with its source's) and, for source entries, ``source_gmacs``. A figure
    that cannot be known here (the source run not recorded) is left out rather than written as NaN."""
    columns = {'train_gmacs': training_gmacs(row, rows)}
    if RECIPES[row['recipe']].source:
        columns['source_gmacs'] = source_gmacs(row, rows)
    return {key: round(value, 1) for key, value in columns.items() if math.isfinite(value)}


def summary_table(rows: List[dict], ks: Sequence[int] = (3, 6, 9, 12)) -> str:
    """README's compact view: model top-1 at the dedicated widths, with the compute of each recipe."""
    columns = ['recipe', 'seeds', 'epochs', 'passes', 'gmacs', 'train_min', *ks]
    head = ['recipe', 'seeds', 'epochs', 'subnet passes', 'train GMACs', 'train (min)'] + [f'k={k}' for k in ks]
    return pipe_table(head, [[line[c] for c in columns] for line in summarize(rows, '')])


def replace_block(path: Path, marker: str, text: str) -> None:
    """Put ``text`` between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path``."""
    start, end = f'<!-- {marker}:start -->', f'<!-- {marker}:end -->'
    content = path.read_text()
    if content.count(start) != 1 or content.count(end) != 1 or content.index(start) > content.index(end):
        raise SystemExit(f'{path}: needs exactly one {start} ... {end} block')
    head, rest = content.split(start)
    path.write_text(head + start + '\n' + text.strip() + '\n' + end + rest.split(end, 1)[1])


def update_docs(rows: List[dict], report: Path) -> None:
    """README (compact table + targets, the budget answers) and docs/training.md (the full report, the budget
    tables) from the same rows."""
    replace_block(ROOT / 'README.md', 'comparison_summary',
                  'Model top-1 (%), mean ± std over seeds (EMA and every k: '
                  '[docs/comparison/comparison.md](docs/comparison/comparison.md)):\n\n'
                  + summary_table(rows) + '\n\n' + targets_table(rows))
    body = (report / 'comparison.md').read_text().split('\n', 2)[2]  # without its title
    replace_block(ROOT / 'docs' / 'training.md', 'comparison_report', body)
    replace_block(ROOT / 'docs' / 'training.md', 'budget_report', budget_report(rows))
    replace_block(ROOT / 'README.md', 'budget_answer', '\n\n'.join(budget_answer(rows, goal)
                                                                  for goal in ('vit', 'scratch')))


def _means(rows: List[dict], recipe: str, prefix: str = '') -> dict:
    runs = [r for r in rows if r['recipe'] == recipe]
    return {k: statistics.mean(r[f'{prefix}top1_k{k}'] for r in runs) for k in HEADS
            if runs and all(f'{prefix}top1_k{k}' in r for r in runs)}


def _compute_multiple(rows: List[dict], recipe: str) -> float:
    """The recipe's subnetwork passes per run relative to the paper recipe's (1 = equal compute); a converted
    entry's include its source run's."""
    def passes(name: str) -> float:
        source = [r['subnet_passes'] for r in rows if r['recipe'] == RECIPES[name].base] if RECIPES[name].source \
            else [0]
        extra = statistics.mean(source) if source else float('nan')  # unknown rather than cheap
        return statistics.mean(r['subnet_passes'] for r in rows if r['recipe'] == name) + extra
    return passes(recipe) / passes('paper_uniform')


def target_margins(rows: List[dict]) -> Dict[str, dict]:
    """The issue's targets per recipe with every k (model top-1 means, p.p.): ``vs_paper``, the worst margin over
    both paper recipes across k = 3..12 (met: >= 0); ``gaps``, the margin to the dedicated ViT at each dedicated k
    (met: >= -0.5); ``worst``, the least of ``vs_paper`` and each gap + 0.5 (>= 0: every target met), at the target
    ``tightest``; ``close``, the targets whose mean margin is within one std of the entry's seeds from its threshold;
    ``missed``, the targets missed on the means (same names); ``met``."""
    papers = [_means(rows, name) for name in ('paper_uniform', 'paper_weighted')]
    dedicated = {RECIPES[n].dedicated: _means(rows, n)[RECIPES[n].dedicated] for n in RECIPES
                 if RECIPES[n].baseline and _means(rows, n)}
    margins = {}
    for name, recipe in RECIPES.items():
        means = _means(rows, name)
        if recipe.dedicated is not None or len(means) < len(HEADS) or not all(len(p) == len(HEADS) for p in papers):
            continue
        to_paper = {k: _margin(means[k] - max(p[k] for p in papers)) for k in HEADS}
        gaps = {k: _margin(means[k] - dedicated[k]) for k in sorted(dedicated)}
        # every target's distance to its limit (>= 0: met), keyed by the target's name
        slack = {**{f'paper k={k}': v for k, v in to_paper.items()},
                 **{f'k={k}': _margin(g + 0.5) for k, g in gaps.items()}}
        tightest = min(slack, key=slack.get)  # the target nearest its limit (or furthest under it)
        # the issue asks for 5 seeds where a mean sits within one std (over this entry's seeds) of a threshold
        stds = _stds(rows, name)
        close = [target for target, v in slack.items() if abs(v) <= stds.get(int(target.rpartition('=')[2]), -1)
                 and not (target.startswith('paper') and name.startswith('paper'))]  # a paper recipe is its reference
        missed = [target for target, v in slack.items() if v < 0]
        margins[name] = {'vs_paper': min(to_paper.values()), 'gaps': gaps, 'worst': slack[tightest],
                         'tightest': tightest, 'close': close, 'missed': missed, 'met': not missed and len(gaps) == 4}
    return margins


def _margin(value: float) -> float:
    """A difference of top-1 values (p.p.), rounded (+ 0.0 turns -0.0 into 0.0): they are counts over 450 images,
    so a tie must not turn into a miss by float noise."""
    return round(value, 6) + 0.0


def _stds(rows: List[dict], recipe: str) -> Dict[int, float]:
    """Model top-1 std over the recipe's seeds per k (none with one seed)."""
    runs = [r for r in rows if r['recipe'] == recipe]
    return {k: statistics.stdev(r[f'top1_k{k}'] for r in runs) for k in HEADS
            if len(runs) > 1 and all(f'top1_k{k}' in r for r in runs)}


def entry_goal(recipe: Recipe) -> str:
    """The budget an entry is held to: 'vit' for one that starts from the trained dedicated 12-head ViT, else
    'scratch' (a source it trains itself counts as its own)."""
    return recipe.goal or ('vit' if recipe.source and recipe.base == 'dedicated_k12' else 'scratch')


def budget_ratio(rows: List[dict], name: str) -> float:
    """What the entry's ``entry_goal`` bounds, from its runs' mean training GMACs (``goal_ratio``); NaN if unknown."""
    source = _mean_gmacs(rows, name, source_gmacs) if RECIPES[name].source else 0.0
    return goal_ratio(entry_goal(RECIPES[name]), _mean_gmacs(rows, name), source, _mean_gmacs(rows, 'dedicated_k12'))


def _mean_gmacs(rows: List[dict], recipe: str, of: Callable[[dict, List[dict]], float] = training_gmacs) -> float:
    """Mean over the recipe's runs of ``of`` (``training_gmacs`` or ``source_gmacs``); NaN without runs."""
    values = [of(r, rows) for r in rows if r['recipe'] == recipe]
    return statistics.mean(values) if values else float('nan')


def targets_table(rows: List[dict]) -> str:
    """The targets per recipe (``target_margins``), its compute against the references, and whether it meets every
    target within its budget (``GOALS``: from scratch <= 1.0x the dedicated 12-head ViT's training GMACs; from
    that trained ViT <= 0.5x of its GMACs beyond it)."""
    margins = target_margins(rows)
    ded_ks = sorted(next(iter(margins.values()))['gaps']) if margins else []
    body = []
    for name, m in margins.items():
        goal, ratio = entry_goal(RECIPES[name]), budget_ratio(rows, name)
        fits = math.isfinite(ratio) and ratio <= GOALS[goal]
        budget = f'{GOAL_NAMES[goal]} <= {GOALS[goal]}x: {"fits" if fits else "over"}'
        body.append([name, _times(_compute_multiple(rows, name), 0), _gmacs_vs(rows, name),
                     _gmacs_vs(rows, name, 'dedicated_k12'), _beyond_source(rows, name), f'{m["vs_paper"]:+.2f}',
                     *(f'{m["gaps"][k]:+.2f}' for k in ded_ks), 'yes' if m['met'] else 'no',
                     budget, 'yes' if m['met'] and fits else 'no', targets_text(m['close'])])
    head = ['recipe', 'compute', 'GMACs vs sandwich_e40', 'GMACs vs dedicated k=12', 'beyond source', 'vs paper',
            *(f'vs dedicated k={k}' for k in ded_ks), 'all met', 'budget', 'met within budget',
            'within 1 std']
    return ('**Targets** (model top-1 means, p.p.): `vs paper` = min over k = 3..12 of recipe - max(paper uniform, '
            'paper weighted), met when >= 0; `vs dedicated k=K` = recipe - dedicated ViT, met when >= -0.5; '
            '`compute` = subnetwork passes relative to the paper recipes; `GMACs vs sandwich_e40` and `GMACs vs '
            'dedicated k=12` = training GMACs (converted entries: with their source) relative to the best 4x-compute '
            'recipe and to the dedicated 12-head ViT; `beyond source` = converted entries\' training GMACs beyond '
            "their source relative to the source's; `budget`: from scratch <= 1.0x the dedicated 12-head ViT's "
            'training GMACs (a source the entry trains itself included), from the trained 12-head ViT <= 0.5x of '
            "its GMACs beyond it; `within 1 std` = the targets whose mean margin lies within one std (over the entry's "
            'seeds, at that k) of its limit: more seeds decide them.\n\n' + pipe_table(head, body))


def source_table(rows: List[dict]) -> str:
    """Source entries at k = 12 against the very weights each run started from (``SOURCE_TOP1``), paired per seed:
    the seed-to-seed spread of the source drops out of the difference, which the targets table (against the
    dedicated ViTs' mean) keeps. Runs recorded without their source's top-1 are left out."""
    body = []
    for name, recipe in RECIPES.items():
        runs = _paired_runs(rows, name)
        if not recipe.source or not runs:
            continue
        diffs = _paired_diffs(runs)
        body.append([name, recipe.base, len(runs), mean_std([r[SOURCE_TOP1] for r in runs]),
                     mean_std([r['top1_k12'] for r in runs]), _signed_mean_std(diffs), f'{min(diffs):+.2f}',
                     f'{sum(d >= -0.5 for d in diffs)}/{len(diffs)}'])
    return ('**Against its own source** (model top-1 at k = 12, %): each converted run against the EMA weights it '
            'started from (its source run of the same seed, recorded in its row as `source_top1_k12`), paired per '
            'seed; `seeds within 0.5` = runs at most 0.5 p.p. under their own source.\n\n'
            + pipe_table(['recipe', 'source', 'seeds', 'source k=12', 'k=12', 'k=12 - source', 'worst seed',
                          'seeds within 0.5'], body))


def _paired_runs(rows: List[dict], recipe: str) -> List[dict]:
    """The recipe's runs that recorded their own source's top-1 at k = 12 (``SOURCE_TOP1``)."""
    return [r for r in rows if r['recipe'] == recipe and SOURCE_TOP1 in r and 'top1_k12' in r]


def _paired_diffs(runs: List[dict]) -> List[float]:
    """k = 12 top-1 minus the run's own source's (p.p.), per run of ``_paired_runs``."""
    return [_margin(r['top1_k12'] - r[SOURCE_TOP1]) for r in runs]


def _seed_count(rows: List[dict], recipe: str) -> int:
    return sum(r['recipe'] == recipe for r in rows)


def _signed_mean_std(values: Sequence[float]) -> str:
    spread = f' ± {statistics.stdev(values):.2f}' if len(values) > 1 else ''
    return f'{statistics.mean(values):+.2f}{spread}'


MIN_SEEDS, BUDGET_SEEDS = 3, 5  # issue 23's rule: 3 seeds, 5 where a mean sits within one std of its limit


def budget_entries(rows: List[dict], goal: str) -> List[str]:
    """Every entry with all targets measured whose mean training GMACs fit ``GOALS[goal]`` (``entry_goal``,
    ``budget_ratio``), whether or not it was planned for it, in ``RECIPES`` order."""
    return [name for name in target_margins(rows) if entry_goal(RECIPES[name]) == goal
            and budget_ratio(rows, name) <= GOALS[goal]]


def settled_by(margins: dict, seeds: int) -> Optional[str]:
    """Why the seeds settle an entry's standing (``target_margins``), or None while more are due: at least
    ``MIN_SEEDS`` with a miss beyond one std, or with no target within one std of its limit; else ``BUDGET_SEEDS``."""
    missed, close = margins['missed'], margins['close']
    if seeds >= MIN_SEEDS and not set(missed) <= set(close):
        return 'a miss beyond one std'
    if seeds >= MIN_SEEDS and not close:
        return 'no target within one std of its limit'
    return f'still within one std at {targets_text(close)}' if seeds >= BUDGET_SEEDS else None


def _seeds_due(seeds: int) -> int:
    return MIN_SEEDS if seeds < MIN_SEEDS else BUDGET_SEEDS


def verdict(margins: dict, seeds: int) -> str:
    """'met' or 'missed' on the means, with 'so far' while ``settled_by`` says more seeds are due."""
    text = 'missed' if margins['missed'] else 'met'
    return text if settled_by(margins, seeds) else f'{text} so far ({_seeds_due(seeds)} seeds decide)'


def targets_text(names: Sequence[str]) -> str:
    """``target_margins``' target names, runs of paper k's joined: 'paper k=4..12, k=3, k=6'."""
    paper = [int(n.split('=')[1]) for n in names if n.startswith('paper')]
    runs = []
    for k in paper:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    out = [f'paper k={a}' if a == b else f'paper k={a}..{b}' for a, b in runs]
    return ', '.join(out + [n for n in names if not n.startswith('paper')])


def family_gmacs(rows: List[dict]) -> float:
    """Training GMACs of the four dedicated ViTs k = 3/6/9/12 together (their means); NaN if one is missing."""
    return sum(_mean_gmacs(rows, name) for name, r in RECIPES.items() if r.baseline)


def budget_answer(rows: List[dict], goal: str) -> str:
    """One sentence per budget: the cheapest entry that meets every target within it (its training GMACs against the
    dedicated 12-head ViT and the four dedicated ViTs, its verdict), or the entry that comes closest."""
    margins, names = target_margins(rows), budget_entries(rows, goal)
    scope = ('From scratch, <= 1.0x the dedicated 12-head ViT\'s training GMACs' if goal == 'scratch' else
             'From the trained 12-head ViT, <= 0.5x of its training GMACs beyond it')
    if not names:
        return f'**{scope}**: no entry with every target measured yet.'
    seeds = {name: _seed_count(rows, name) for name in names}
    met = [name for name in names if margins[name]['met']]
    if not met:
        best = max(names, key=lambda name: margins[name]['worst'])
        return (f'**{scope}: every entry misses** ({len(names)} entries). The closest, `{best}`, misses '
                f'{targets_text(margins[best]["missed"])} on the means of {seeds[best]} seeds, the worst '
                f'({margins[best]["tightest"]}) by {-margins[best]["worst"]:.2f} p.p. '
                f'({_decided_text(margins[best], seeds[best])}).')
    best = min(met, key=lambda name: _mean_gmacs(rows, name))
    total, k12, family = _mean_gmacs(rows, best), _mean_gmacs(rows, 'dedicated_k12'), family_gmacs(rows)
    recipe, beyond = RECIPES[best], ''
    if recipe.source and goal == 'vit':
        beyond = f', {_beyond_source(rows, best)} beyond its source'
    elif recipe.source:  # from scratch: the source is a part of the entry's own cost
        beyond = f' (its source `{recipe.base}` included)'
    among = 'the only entry that does' if len(met) == 1 else f'the cheapest of {len(met)} entries that do'
    return (f'**{scope}: `{best}` meets every target** on the means of {seeds[best]} seeds '
            f'({_decided_text(margins[best], seeds[best])}; the tightest, {margins[best]["tightest"]}, '
            f'{margins[best]["worst"]:.2f} p.p. inside its limit), {among}: '
            f'{total:,.0f} training GMACs{beyond}, {_times(total / k12)} the dedicated 12-head ViT\'s and '
            f'{_times(total / family)} the four dedicated ViTs k = 3/6/9/12 together ({family:,.0f}); '
            f'{_run_text(best)}.')


def _run_text(name: str) -> str:
    """How a user runs an entry: its config and make target (``DEMOS``), else the comparison's command."""
    config, target = DEMOS.get(name, (None, None))
    if config is None:
        return f'`python scripts/compare_recipes.py --recipes {name}`'
    return f'`{config}`' + (f', `{target}`' if target else '')


def _decided_text(margins: dict, seeds: int) -> str:
    """``settled_by``'s reason, or what is still open and how many seeds decide it."""
    reason = settled_by(margins, seeds)
    if reason or seeds < MIN_SEEDS:
        return reason or f'{MIN_SEEDS} seeds decide'
    return f'within one std at {targets_text(margins["close"])}: {BUDGET_SEEDS} seeds decide'


def budget_table(rows: List[dict], goal: str) -> str:
    """The entries within one budget (``budget_entries``; '' if none): cost, margins (p.p., missed ones in bold),
    the targets within one std of their limit, for converted entries k = 12 against their own source paired per seed,
    and the ``verdict``."""
    margins, names, source = target_margins(rows), budget_entries(rows, goal), goal == 'vit'
    if not names:
        return ''
    ded_ks = sorted(margins[names[0]]['gaps'])
    body = []
    for name in names:
        m, seeds = margins[name], _seed_count(rows, name)
        cells = [f'`{name}`', seeds, _gmacs_text([_mean_gmacs(rows, name)]), _gmacs_vs(rows, name, 'dedicated_k12')]
        cells += [_beyond_source(rows, name)] if source else []
        cells += [_bold(m['vs_paper'], 0.0)] + [_bold(g, -0.5) for g in m['gaps'].values()]
        cells.append(targets_text(m['close']) or 'none')
        if source:
            diffs = _paired_diffs(_paired_runs(rows, name))
            cells += [_signed_mean_std(diffs), f'{sum(d >= -0.5 for d in diffs)}/{len(diffs)}'] if diffs else ['', '']
        body.append(cells + [verdict(m, seeds)])
    head = ['entry', 'seeds', 'train GMACs', 'vs dedicated k=12'] + (['beyond source'] if source else [])
    head += ['vs paper'] + [f'k={k}' for k in ded_ks]
    head += ['within 1 std'] + (['k=12 - own source', 'seeds within 0.5'] if source else []) + ['verdict']
    return pipe_table(head, body)


def budget_report(rows: List[dict]) -> str:
    """Both budgets of issue 23: the answer, then the table of every entry within it (docs/training.md)."""
    notes = ('Margins in p.p. of model top-1 means: `vs paper` against the better paper recipe at its worst k (limit '
             '0), `k=K` against the dedicated ViT (limit -0.5), a missed target in bold; `within 1 std` = targets '
             'whose mean lies within one std of its seeds from the limit; `verdict`: settled with '
             f'{BUDGET_SEEDS} seeds, or with {MIN_SEEDS} when an entry that meets every target has none within one '
             'std of its limit or one that misses has a miss beyond one std ("so far" otherwise). Every entry whose '
             'training GMACs fit the budget is listed, planned for it or not.')
    parts = [notes] + [part for goal in ('vit', 'scratch') for part in (budget_answer(rows, goal),
                                                                          budget_table(rows, goal))]
    return '\n\n'.join(part for part in parts if part)


def _bold(margin: float, limit: float) -> str:
    return f'**{margin:+.2f}**' if margin < limit else f'{margin:+.2f}'


def _gmacs_vs(rows: List[dict], recipe: str, reference: str = 'sandwich_e40') -> str:
    return _times(_mean_gmacs(rows, recipe) / _mean_gmacs(rows, reference))


def _beyond_source(rows: List[dict], recipe: str) -> str:
    """A source entry's mean training GMACs beyond its source's, relative to the source's ('' for others)."""
    if not RECIPES[recipe].source:
        return ''
    total, source = _mean_gmacs(rows, recipe), _mean_gmacs(rows, recipe, source_gmacs)
    return _times((total - source) / source)


def _times(ratio: float, digits: int = 2) -> str:
    """``1.95x``; '' for a figure that is not known (a source run not recorded: NaN)."""
    return f'{ratio:.{digits}f}x' if math.isfinite(ratio) else ''


def _column_order(key: str):
    fixed = ['recipe', 'seed', 'epochs', 'subnet_passes', 'passes_per_k', 'teacher_forwards', 'train_gmacs',
             'source_gmacs', SOURCE_TOP1, 'train_s', 'wall_s', 'cpu_s', 'threads', 'resumed', 'commit']
    if key in fixed:
        return (0, fixed.index(key), '')
    prefix, _, k = key.rpartition('_k')
    return (1 if prefix == 'top1' else 2, int(k) if k.isdigit() else 0, key)


def plot(rows: List[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(21, 4.8), dpi=90, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (('', 'model'), ('ema_', 'EMA'), ('', 'model, top of the range'))
    for ax, (prefix, title) in zip(axes, panels, strict=True):
        _plot_recipes(ax, rows, prefix)
        ax.set_title(f'top-1 vs k ({title}), mean ± std over seeds', fontsize='medium')
        ax.set_xlabel('k (heads); embed dim = 16 k')
        ax.set_ylabel('top-1 (%)')
        ax.grid(alpha=.3)
    axes[1].sharey(axes[0])
    # the recipes that matter sit within a few p.p. of the dedicated ViTs: the third panel zooms in on them
    axes[2].set_ylim(_zoom_floor(rows), 100)
    # one legend beside the panels: its labels carry each entry's training GMACs, too long to sit inside a panel
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize='small', loc='outside right upper')
    fig.savefig(path)


COST_FLOOR = -2.0  # p.p.: the cost plot's lowest margin; entries further under are drawn on it, their value written


def plot_cost(rows: List[dict], path: Path):
    """Each entry's worst target margin (``target_margins``) against its training GMACs relative to the dedicated
    12-head ViT's, with both budgets: where the cheapest entry that meets every target sits. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k12 = _mean_gmacs(rows, 'dedicated_k12')
    fig = Figure(figsize=(10, 6), dpi=90, layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    points = []
    for name, margin in target_margins(rows).items():
        x = _mean_gmacs(rows, name) / k12
        if math.isfinite(x):
            points.append((x, max(margin['worst'], COST_FLOOR), name, margin))
    on_floor = 0
    for x, y, name, margin in sorted(points):
        vit = entry_goal(RECIPES[name]) == 'vit'
        ax.plot(x, y, 's' if vit else 'o', color='tab:green' if margin['met'] else 'tab:red', ms=6)
        label = name + (f' ({margin["worst"]:+.1f})' if margin['worst'] < COST_FLOOR else '')
        # the entries far under the targets share the floor: their labels stacked upwards, left to right
        lift, on_floor = (9 * on_floor, on_floor + 1) if margin['worst'] < COST_FLOOR else (0, on_floor)
        ax.annotate(label, (x, y), xytext=(4, 3 + lift), textcoords='offset points', fontsize='x-small')
    ax.axvline(GOALS['scratch'], color='tab:blue', ls='--', label=f'from scratch: <= {GOALS["scratch"]}x')
    ax.axvline(1 + GOALS['vit'], color='tab:purple', ls=':',
               label=f'from the trained 12-head ViT (squares): its 1x + <= {GOALS["vit"]}x beyond it')
    ax.axhline(0, color='black', lw=.8)
    ax.set_ylim(COST_FLOOR - 0.3, None)
    ax.set_xlabel("training GMACs / the dedicated 12-head ViT's (converted entries: with their source)")
    ax.set_ylabel('worst target margin (p.p.): min(vs paper, vs dedicated + 0.5)')
    ax.set_title('every target met (green) at >= 0; model top-1 means over seeds', fontsize='medium')
    ax.grid(alpha=.3)
    ax.legend(fontsize='small', loc='lower right')
    fig.savefig(path)
    return fig


def _zoom_floor(rows: List[dict]) -> float:
    """A whole percent under the lowest mean of the dedicated ViTs and the paper recipes."""
    means = [v for n in RECIPES if RECIPES[n].baseline or n.startswith('paper') for v in _means(rows, n).values()]
    return float(int(min(means)) - 1) if means else 0.0


def _legend(rows: List[dict], recipe: str, seeds: int) -> str:
    """``recipe (seeds, compute multiple, training GMACs = multiple of the dedicated 12-head ViT's)``."""
    label = f'{recipe} ({seeds} seed{"s" if seeds > 1 else ""}'
    if any(r['recipe'] == 'paper_uniform' for r in rows):
        label += f', {_times(_compute_multiple(rows, recipe), 0) or "?"} compute'
    label += f', {_gmacs_text([training_gmacs(r, rows) for r in rows if r["recipe"] == recipe]) or "?"} GMACs'
    vs_k12 = _gmacs_vs(rows, recipe, 'dedicated_k12')
    return label + (f' = {vs_k12} k=12' if vs_k12 else '') + ')'


def _plot_recipes(ax, rows: List[dict], prefix: str) -> None:
    from matplotlib import colormaps

    palette = colormaps['tab20'].colors + colormaps['tab20b'].colors  # more recipes than the default cycle's 10
    dedicated = {}
    for i, (name, recipe) in enumerate(RECIPES.items()):
        runs = [r for r in rows if r['recipe'] == name]
        if not runs:
            continue
        if recipe.dedicated is not None:  # the baselines as one series; a shorter source run only in the tables
            if recipe.baseline:
                dedicated[recipe.dedicated] = [r[f'{prefix}top1_k{recipe.dedicated}'] for r in runs]
            continue
        ks = [k for k in HEADS if all(f'{prefix}top1_k{k}' in r for r in runs)]
        values = [[r[f'{prefix}top1_k{k}'] for r in runs] for k in ks]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        # dark shades, then light ones, of tab20 for the first 20 recipes, of tab20b for the next 20
        colour = palette[20 * (i // 20 % 2) + (2 * i) % 20 + (2 * i) // 20 % 2]
        ax.errorbar(ks, means, yerr=stds, marker='o', ms=3, capsize=2, label=_legend(rows, name, len(runs)),
                    color=colour, ls='--' if recipe.source else '-')
    if dedicated:
        ks = sorted(dedicated)
        ax.errorbar(ks, [statistics.mean(dedicated[k]) for k in ks],
                    yerr=[statistics.stdev(dedicated[k]) if len(dedicated[k]) > 1 else 0.0 for k in ks],
                    fmt='s', color='black', ms=6, capsize=3, label=_dedicated_legend(rows))


def _dedicated_legend(rows: List[dict]) -> str:
    k12 = [training_gmacs(r, rows) for r in rows if r['recipe'] == 'dedicated_k12']
    return 'dedicated ViT (one per k' + (f'; k=12: {_gmacs_text(k12)} GMACs)' if k12 else ')')


# --- entry point -------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default='data/digits', help='digits ImageFolder (made if missing)')
    parser.add_argument('--recipes', nargs='+', default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--runs', default='output/compare', help='run folders (default: output/compare)')
    parser.add_argument('--report', default='docs/comparison', help='tables and plot (default: docs/comparison)')
    parser.add_argument('--jobs', type=int, default=2, help='runs side by side, 2 // jobs threads each (default: 2)')
    parser.add_argument('--report-only', action='store_true', help='rewrite the report from finished runs')
    parser.add_argument('--list', action='store_true', help='print the plan and what is done, run nothing')
    parser.add_argument('--update-docs', action='store_true',
                        help="put the tables into README.md and docs/training.md (between their markers)")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> List[tuple]:
    """(recipe, seed) cells in run order: seed by seed, so every recipe has a result early."""
    return [(RECIPES[name], seed) for seed in args.seeds for name in RECIPES if name in args.recipes]


def with_teachers(todo: List[tuple], runs: Path) -> List[tuple]:
    """A teacher or source recipe needs its dedicated 12-head run's weights of its seed: train it again where they
    are not on this machine (its new result replaces the recorded one). Within a seed the base runs go first and
    the recipes that wait for one last, so that no worker of ``--jobs`` sleeps on a base while other runs are left."""
    cells = list(todo)
    for recipe, seed in todo:
        dedicated = (RECIPES[recipe.base], seed)
        if recipe.needs_k12 and not teacher_file(runs, seed, recipe.base).is_file() and dedicated not in cells:
            cells.append(dedicated)
    names = {(recipe.name, seed) for recipe, seed in cells}
    waits = {(recipe.name, seed) for recipe, seed in cells if recipe.needs_k12 and (recipe.base, seed) in names}
    bases = {(RECIPES[name].base, seed) for name, seed in waits}
    seeds = list(dict.fromkeys(seed for _, seed in cells))

    def rank(cell: tuple) -> tuple:
        key = (cell[0].name, cell[1])
        return seeds.index(cell[1]), 0 if key in bases else 2 if key in waits else 1

    return sorted(cells, key=rank)  # stable: plan order within each rank


def run_all(todo: List[tuple], data: Path, runs: Path, report: Path, jobs: int) -> None:
    """Run the cells ``jobs`` at a time, in plan order (a teacher run waits for its teacher, started before it),
    rewriting the report after each."""
    lock, done = Lock(), []
    threads = max(1, 2 // jobs)

    def task(cell):
        recipe, seed = cell
        row = run_one(recipe, seed, data, runs, threads)
        with lock:
            done.append(row)
            print(f'[compare] done {len(done)}/{len(todo)}: {recipe.name} seed {seed} in {row["wall_s"] / 60:.1f} '
                  f'min', flush=True)
            write_report(load_results(runs, report), report)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(task, cell) for cell in todo]:
            future.result()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    data, runs, report = (Path(p).resolve() for p in (args.data, args.runs, args.report))
    cells = plan(args)
    if args.list:
        done = {(row['recipe'], row['seed']) for row in load_results(runs, report)}
        for recipe, seed in cells:
            state = 'done' if (recipe.name, seed) in done else 'todo'
            print(f'{state}  {recipe.name:<22} seed {seed}  {plan_text(recipe)}  {" ".join(recipe.train_flags())}')
        return 0
    if not args.report_only:
        if not data.is_dir():
            subprocess.run([sys.executable, 'scripts/prepare_digits.py', str(data)], cwd=ROOT, check=True)
        done = {(row['recipe'], row['seed']) for row in load_results(runs, report)}
        todo = [(r, s) for r, s in cells if (r.name, s) not in done]
        todo = with_teachers(todo, runs)
        run_all(todo, data, runs, report, args.jobs)
    rows = load_results(runs, report)
    if rows:
        write_report(rows, report)
        if args.update_docs:
            update_docs(rows, report)
        print((report / 'comparison.md').read_text())
    return 0


if __name__ == '__main__':
    os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    sys.exit(main())
