"""The step objective: several subnetworks per step, in-place and teacher distillation, warm-up, and the training
runs that use them (resume, DDP, bad combinations)."""
import copy
import csv
import logging
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import timm
import torch
import torch.nn.functional as F
from test_train import ROOT, base_args, load, make_image_folder, run_train

from hydravit.training.objective import (
    StepLosses,
    StepObjective,
    hard_distillation_loss,
    soft_distillation_loss,
)
from hydravit.training.sampler import HeadSampler

MODEL = 'hydravit_dyn_patch4_32'


def _model() -> torch.nn.Module:
    return timm.create_model(MODEL, num_classes=3)


def _batch(n: int = 4):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 3, (n,))


def _run_objective(model, objective, batches, heads):
    """One optimizer step of ``objective`` over ``batches`` (gradient accumulation), gradients left in place."""
    losses = StepLosses.zeros(torch.device('cpu'))
    for i, (x, y) in enumerate(batches):
        objective.micro_batch(model, x, y, heads, nullcontext, lambda loss, final: loss.backward(),
                              lambda final: nullcontext(), last_micro_batch=i == len(batches) - 1,
                              divisor=len(batches), losses=losses)
    return losses


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the losses ----------------------------------------------------------------------------------------------
def test_soft_kd_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10) * 3
    assert soft_distillation_loss(logits, logits.clone(), temperature=2.0).abs().item() < 1e-6
    assert soft_distillation_loss(logits, torch.randn(8, 10), temperature=2.0).item() > 0.01


def test_soft_kd_is_tau_squared_kl_of_tempered_softmaxes():
    s, t, tau = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = torch.softmax(t / tau, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau ** 2
    assert soft_distillation_loss(s, t, tau).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_kd_is_cross_entropy_with_the_teacher_argmax():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.equal(hard_distillation_loss(s, t), F.cross_entropy(s, t.argmax(-1)))


# --- one step ------------------------------------------------------------------------------------------------
def test_multi_subnet_gradients_are_the_sum_of_per_subnet_gradients():
    torch.manual_seed(0)
    model = _model()
    reference = copy.deepcopy(model)
    batches = [_batch(), _batch()]
    objective = StepObjective(HeadSampler([3, 6, 12]), torch.nn.CrossEntropyLoss(), num_subnets=3,
                              policy='sandwich')
    heads = objective.draw(epoch=0)
    assert heads == [12, 6, 3]
    losses = _run_objective(model, objective, batches, heads)
    assert losses.num_subnets == 6 and losses.num_distilled == 0
    total = None
    for k in heads:  # each subnetwork's accumulated gradient, computed on its own
        reference.zero_grad(set_to_none=True)
        reference.set_heads(k)
        for x, y in batches:
            (F.cross_entropy(reference(x), y) / len(batches)).backward()
        grads = _grads(reference)
        total = grads if total is None else {n: total[n] + grads[n] for n in total}
    step = _grads(model)
    assert step.keys() == total.keys()
    for name in total:
        torch.testing.assert_close(step[name], total[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inplace_kd_uses_detached_logits_of_the_largest_or_the_next_larger():
    for chain in ('largest', 'progressive'):
        torch.manual_seed(0)
        model = _model()
        reference = copy.deepcopy(model)
        x, y = _batch()
        objective = StepObjective(HeadSampler([3, 6, 12]), torch.nn.CrossEntropyLoss(), num_subnets=3,
                                  policy='sandwich', inplace_kd=True, kd_chain=chain, kd_alpha=0.7,
                                  kd_temperature=2.0)
        losses = _run_objective(model, objective, [(x, y)], [12, 6, 3])
        assert losses.num_distilled == 2
        outputs = {}
        for k in (12, 6, 3):  # the references are detached: no gradient flows back into the teacher subnetwork
            reference.set_heads(k)
            out = reference(x)
            loss = F.cross_entropy(out, y)
            if k != 12:
                teacher = outputs[12] if chain == 'largest' else outputs[{6: 12, 3: 6}[k]]
                loss = 0.3 * loss + 0.7 * soft_distillation_loss(out, teacher, 2.0)
            loss.backward()
            outputs[k] = out.detach()
        expected = _grads(reference)
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=f'{chain}: {name}')


def test_external_teacher_is_frozen_and_serves_every_subnetwork():
    torch.manual_seed(0)
    model = _model()
    teacher = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=3).eval()
    teacher.requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    objective = StepObjective(HeadSampler([3, 6, 12]), torch.nn.CrossEntropyLoss(), num_subnets=2,
                              policy='sandwich', teacher=teacher, teacher_kd='hard')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        losses = _run_objective(model, objective, [_batch()], objective.draw(epoch=0))
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 3  # once per micro-batch, whatever the number of subnetworks
    assert losses.num_distilled == 2  # without --inplace-kd every subnetwork learns from the teacher
    assert all(torch.equal(v, before[n]) for n, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_full_width_warmup_trains_only_the_largest():
    objective = StepObjective(HeadSampler([3, 6, 12]), torch.nn.CrossEntropyLoss(), num_subnets=2,
                              policy='sandwich', full_warmup_epochs=2)
    assert [objective.draw(epoch=e) for e in (0, 1, 2)] == [[12], [12], [12, 3]]


# --- training runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    teacher = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=2)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save({'state_dict': teacher.state_dict()}, path)
    return path


def _teacher_flags(path) -> tuple:
    return ('--teacher', 'vit_tiny_patch16_224', '--teacher-checkpoint', str(path),
            '--teacher-kwargs', 'img_size=32', 'patch_size=8', 'depth=1', 'num_classes=2')


RECIPE = ('--subnets-per-step', '3', '--subnet-policy', 'sandwich', '--inplace-kd', '--kd-chain', 'progressive')


def test_resume_is_exact_with_sandwich_inplace_kd_and_teacher(data_dir, teacher_file, tmp_path):
    from test_train import _assert_same_training_state
    common = (*RECIPE, *_teacher_flags(teacher_file), '--heads', '3', '4', '6', '12', '--mixup', '0.3',
              '--model-ema', '--model-ema-decay', '0.5', '--eval-interval', '2')
    assert run_train(*base_args(data_dir, tmp_path, 'straight', *common, '--epochs', '2')) == 0
    assert run_train(*base_args(data_dir, tmp_path, 'split', *common, '--epochs', '1')) == 0
    assert run_train(*base_args(data_dir, tmp_path, 'split', *common, '--epochs', '2',
                                '--resume', str(tmp_path / 'split' / 'last.pth.tar'))) == 0
    straight, resumed = load(tmp_path / 'straight' / 'last.pth.tar'), load(tmp_path / 'split' / 'last.pth.tar')
    _assert_same_training_state(straight, resumed)
    assert sum(straight['sampler']['counts']) == 2 * 2 * 3  # 2 epochs x 2 steps x 3 subnetworks
    counts = dict(zip(straight['heads'], straight['sampler']['counts'], strict=True))
    assert counts[12] == counts[3] == 4  # sandwich: largest and smallest every step


def test_logs_and_summary_show_head_sets_and_loss_parts(data_dir, teacher_file, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert run_train(*base_args(data_dir, tmp_path, 'parts', *RECIPE, *_teacher_flags(teacher_file))) == 0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train:')]
    assert progress and 'k: 12,6,3' in progress[-1] and '(CE ' in progress[-1] and ', KD ' in progress[-1]
    with open(tmp_path / 'parts' / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    assert float(row['train_loss_ce']) > 0 and float(row['train_loss_kd']) > 0 and float(row['train_loss']) > 0


def test_warmup_epoch_trains_only_the_largest(data_dir, tmp_path):
    assert run_train(*base_args(data_dir, tmp_path, 'warm', '--subnets-per-step', '2', '--subnet-policy',
                                'sandwich', '--full-warmup-epochs', '1')) == 0
    assert load(tmp_path / 'warm' / 'last.pth.tar')['sampler']['counts'] == [0, 0, 2]


def test_two_process_gloo_run_with_sandwich(data_dir, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    env.pop('TORCHRUN_ARGS', None)
    argv = base_args(data_dir, tmp_path, 'ddp', '--subnets-per-step', '2', '--subnet-policy', 'sandwich',
                     '--inplace-kd', '--heads', '3', '6', '12')
    proc = subprocess.run([str(ROOT / 'distributed_train.sh'), '2', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load(tmp_path / 'ddp' / 'last.pth.tar')
    # batch 4 x 2 ranks = one step; both ranks train k = 12 and 3
    assert ckpt['sampler']['counts'] == [2, 0, 2]


# --- bad combinations ----------------------------------------------------------------------------------------
def _mismatched_file(tmp_path):
    path = tmp_path / 'cnn.pth'
    torch.save(timm.create_model('resnet10t', num_classes=2).state_dict(), path)
    return path


BAD = [
    (('--subnets-per-step', '4'), '--subnets-per-step: 4 distinct subnetworks per step, but --heads has only 3'),
    (('--subnets-per-step', '0'), '--subnets-per-step: must be >= 1, got 0'),
    (('--subnet-policy', 'stratified'), '--subnet-policy stratified: needs --subnets-per-step >= 2'),
    (('--inplace-kd',), '--inplace-kd: needs --subnets-per-step >= 2'),
    (('--subnets-per-step', '2', '--inplace-kd', '--kd-alpha', '1.5'), '--kd-alpha: must be in [0, 1], got 1.5'),
    (('--kd-alpha', '-0.1'), '--kd-alpha: must be in [0, 1], got -0.1'),
    (('--kd-temperature', '0'), '--kd-temperature: must be > 0, got 0.0'),
    (('--full-warmup-epochs', '-1'), '--full-warmup-epochs: must be >= 0, got -1'),
    (('--teacher', 'resnet10t'), '--teacher-checkpoint: required with --teacher'),
    (('--teacher-heads', '3'), '--teacher-heads: given without --teacher'),
    (('--teacher', 'no_such_net', '--teacher-checkpoint', 'x.pth'), "--teacher: unknown model 'no_such_net'"),
    (('--teacher', 'resnet10t', '--teacher-checkpoint', 'MISSING'), '--teacher-checkpoint: file not found'),
    (('--teacher', 'resnet10t', '--teacher-checkpoint', 'CNN'), '--teacher: resnet10t has 1000 classes, the '
                                                                  'student 2'),
    (('--teacher', 'vit_tiny_patch16_224', '--teacher-checkpoint', 'CNN', '--teacher-kwargs', 'img_size=32',
      'num_classes=2'), '--teacher-checkpoint: '),
    (('--teacher', MODEL, '--teacher-checkpoint', 'CNN', '--teacher-kwargs', 'num_classes=2',
      '--teacher-heads', '20'), '--teacher-checkpoint: '),
]


@pytest.mark.parametrize('flags, message', BAD, ids=[' '.join(f) for f, _ in BAD])
def test_bad_combinations_fail_early_naming_the_flag(data_dir, tmp_path, capsys, flags, message):
    flags = [str(_mismatched_file(tmp_path)) if f == 'CNN' else str(tmp_path / 'none.pth') if f == 'MISSING'
             else f for f in flags]
    out = tmp_path / 'out'
    assert run_train(*base_args(data_dir, out, 'bad', *flags)) == 2
    err = capsys.readouterr().err
    assert f'error: {message}' in err, err
    assert not out.exists()


def test_teacher_heads_out_of_range_is_refused(data_dir, tmp_path, capsys):
    path = tmp_path / 'hydra.pth'
    torch.save(timm.create_model(MODEL, num_classes=2).state_dict(), path)
    argv = base_args(data_dir, tmp_path / 'out', 'bad', '--teacher', MODEL, '--teacher-checkpoint', str(path),
                     '--teacher-kwargs', 'num_classes=2', '--teacher-heads', '20')
    assert run_train(*argv) == 2
    assert 'error: --teacher-heads: head counts must be ints in 1..12, got [20]' in capsys.readouterr().err


def test_plus_imagenet_recipe_loads_and_its_scala_flags_need_a_teacher_file(tmp_path, capsys):
    from hydravit.training.config import parse_args
    recipe = str(ROOT / 'configs' / 'hydravit_plus_imagenet.yaml')
    args, _ = parse_args([str(tmp_path), '--config', recipe])
    assert (args.subnets_per_step, args.subnet_policy, args.inplace_kd, args.teacher) == (4, 'sandwich', False, '')
    assert args.mixup == 0.8 and args.model_ema_decay == 0.99996  # the paper's recipe underneath
    scala = ['--inplace-kd', '--kd-chain', 'progressive', '--subnet-policy', 'stratified', '--full-warmup-epochs',
             '10', '--teacher', 'regnety_160', '--teacher-kd', 'hard']  # the header's Scala line
    args, _ = parse_args([str(tmp_path), '--config', recipe, *scala, '--teacher-checkpoint', 'regnety_160.pth'])
    assert (args.inplace_kd, args.kd_chain, args.subnet_policy, args.full_warmup_epochs) == (
        True, 'progressive', 'stratified', 10)
    assert run_train(str(tmp_path), '--config', recipe, *scala) == 2
    assert 'error: --teacher-checkpoint: required with --teacher' in capsys.readouterr().err
