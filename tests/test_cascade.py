"""Confidence cascades: exit logic, the runtime (eager, stub CUDA graphs, ONNX), the offline evaluation against real
runs, and ``validate.py --cascade``."""
import json
import math

import pytest
import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

from hydravit.deploy.cascade import (
    CascadeRunner,
    bucket_size,
    compiled_stages,
    default_buckets,
    eager_stages,
    graph_cascade,
    graph_stages,
    onnx_stages,
)
from hydravit.evaluation import accuracy
from hydravit.evaluation.cascade import (
    CascadeRecords,
    CascadeSpec,
    cap_reruns,
    collect_records,
    confidence,
    evaluate_cascade,
    exit_stages,
    summary_keys,
)
from hydravit.evaluation.common import read_results
from hydravit.evaluation.macs import profile_heads

SMALL = 'hydravit_dyn_patch4_32'
LADDER = (3, 6, 12)


# --- helpers ------------------------------------------------------------------------------------------------------
def records_of(logits: dict, target: torch.Tensor) -> CascadeRecords:
    """Records built straight from per-k logits (what ``collect_records`` stores, computed here by hand)."""
    heads = sorted(logits)
    return CascadeRecords(heads, target, {k: logits[k].argmax(1) for k in heads},
                          {k: logits[k].topk(min(5, logits[k].shape[1]), 1).indices.eq(target[:, None]).any(1)
                           for k in heads},
                          {r: {k: confidence(logits[k], r) for k in heads} for r in ('entropy', 'max_prob')})


def table_stages(table: dict) -> dict:
    """Stub stages: image i is the row ``[i]``; stage k answers ``table[k][i]``."""
    return {k: (lambda x, k=k: table[k][x[:, 0].long()]) for k in table}


def gap_threshold(values: torch.Tensor) -> float:
    """A threshold in the widest gap between the middle values: far from every value, so a sub-batch's last-bit
    differences cannot move an image across it."""
    v = values.sort().values
    lo, hi = len(v) // 4, max(len(v) // 4 + 1, 3 * len(v) // 4)
    i = max(range(lo, hi), key=lambda j: float(v[j + 1] - v[j]))
    assert float(v[i + 1] - v[i]) > 1e-5
    return float(v[i] + v[i + 1]) / 2


def small_model(num_classes: int = 10) -> torch.nn.Module:
    """Weights like a trained model's (distinct tensors), confidences that differ between images."""
    torch.manual_seed(0)
    model = timm.create_model(SMALL, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def expect_exit(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        accuracy.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- exit logic on hand-made logits ---------------------------------------------------------------------------------
CONFIDENT, UNSURE = 10., 0.
HAND = {  # 4 images, 3 classes; image 0 and 3 exit at k=3, image 1 at k=6, image 2 runs to k=12
    3: torch.tensor([[CONFIDENT, 0, 0], [0, 0, UNSURE], [0, UNSURE, 0], [CONFIDENT, 0, 0]]),
    6: torch.tensor([[0, 0, 1.], [0, CONFIDENT, 0], [UNSURE, 0, 0], [0, 1., 0]]),
    12: torch.tensor([[0, 1., 0], [1., 0, 0], [0, 0, 5.], [0, 0, 1.]]),
}
HAND_TARGET = torch.tensor([0, 1, 2, 1])
HAND_GMACS = {3: 1.0, 6: 4.0, 12: 16.0}


@pytest.mark.parametrize('rule, threshold', [('entropy', 0.5), ('max_prob', 0.9)])
def test_exit_logic_on_hand_made_logits(rule, threshold):
    records = records_of(HAND, HAND_TARGET)
    # entropy of [10, 0, 0]: p = e^10 / (e^10 + 2); of a uniform row: ln 3 = 1.0986 nats
    p = math.exp(10) / (math.exp(10) + 2)
    assert records.scores['entropy'][3][0].item() == pytest.approx(-p * math.log(p) - 2 * (1 - p) / 2
                                                                   * math.log((1 - p) / 2), rel=1e-4)
    assert records.scores['entropy'][3][1].item() == pytest.approx(math.log(3), rel=1e-6)
    spec = CascadeSpec(LADDER, rule, (threshold, threshold))
    assert exit_stages(records, spec).tolist() == [0, 1, 2, 0]
    result = evaluate_cascade(records, spec, HAND_GMACS)
    # every image pays k=3, images 1 and 2 pay k=6, image 2 pays k=12: (4*1 + 2*4 + 1*16) / 4
    assert result.mean_gmacs == pytest.approx(7.0)
    assert result.mean_passes == pytest.approx(7 / 4)
    assert result.stage_share == [50., 25., 25.]
    # image 0 right and image 3 wrong at k=3; image 1 right at k=6; image 2 right at k=12
    assert result.stage_top1 == [50., 100., 100.]
    assert result.top1 == 75.
    # a threshold nothing passes: everything at k=12 (right on image 2 only), which costs all three widths
    none = evaluate_cascade(records, CascadeSpec(LADDER, rule, (-1.,) * 2 if rule == 'entropy' else (1.1,) * 2),
                            HAND_GMACS)
    assert none.stage_share == [0., 0., 100.] and none.stage_top1 == [None, None, 25.] and none.mean_gmacs == 21.


def test_runner_answers_are_the_per_k_answers_it_selected_on_hand_made_logits():
    spec = CascadeSpec(LADDER, 'entropy', (0.5, 0.5))
    out = CascadeRunner(table_stages(HAND), spec)(torch.arange(4.)[:, None])
    assert out.stage.tolist() == [0, 1, 2, 0]
    assert out.batch_sizes == [4, 2, 1]
    for i, s in enumerate(out.stage.tolist()):
        assert torch.equal(out.logits[i], HAND[LADDER[s]][i])


def test_runner_stops_when_every_image_exited():
    calls = []
    stages = {k: (lambda x, k=k: calls.append(k) or HAND[3][x[:, 0].long()]) for k in LADDER}
    out = CascadeRunner(stages, CascadeSpec(LADDER, 'entropy', (0.5, 0.5)))(torch.tensor([[0.], [3.]]))
    assert calls == [3] and out.stage.tolist() == [0, 0] and out.batch_sizes == [2]


# --- re-run caps ------------------------------------------------------------------------------------------------------
# 6 images at k=3 with 2 classes: entropies rise with the image's index except that images 1 and 4 tie (same logits)
CAP_LOGITS = {3: torch.tensor([[9., 0], [2., 0], [1.5, 0], [1., 0], [2., 0], [0., 0]]),
              12: torch.tensor([[0., 9]] * 6)}
CAP_TARGET = torch.ones(6, dtype=torch.long)


def test_rerun_cap_sends_on_the_least_confident_and_ties_by_position():
    records = records_of(CAP_LOGITS, CAP_TARGET)
    batches = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    # only image 0 is confident enough: 5 images want k=12, the cap lets floor(2 / 3 * 6) = 4 go on
    spec = CascadeSpec((3, 12), 'entropy', (0.01,), rerun_cap=(2 / 3,))
    assert spec.rerun_limit(0, 6) == 4 and spec.name == '3->12 entropy<=0.01 rerun<=0.667'
    # the least confident: images 5, 3, 2, then of the tie 1 / 4 (entropy of [2, 0]) the earlier in the batch
    assert exit_stages(records, spec, batches).tolist() == [[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0]]
    uncapped = CascadeSpec((3, 12), 'entropy', (0.01,))
    assert exit_stages(records, uncapped, batches).tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    # the same batches through the runner, image i being the row [i]
    for row in batches:
        out = CascadeRunner(table_stages(CAP_LOGITS), spec)(row.float()[:, None])
        assert out.stage.tolist() == exit_stages(records, spec, row[None])[0].tolist() and out.batch_sizes == [6, 4]
    # max_prob: the least confident are those of lowest top-1 probability, the same images
    prob = CascadeSpec((3, 12), 'max_prob', (0.9999,), rerun_cap=(2 / 3,))
    assert exit_stages(records, prob, batches).tolist() == exit_stages(records, spec, batches).tolist()
    # figures over the batches' answers: k=12 is right on every image, k=3 on none; 8 of the 12 answers ran k=12
    result = evaluate_cascade(records, spec, {3: 1., 12: 10.}, batches)
    assert result.num_images == 12 and result.top1 == pytest.approx(200 / 3)
    assert result.mean_gmacs == pytest.approx(1 + 10 * 8 / 12)
    assert result.stage_share == pytest.approx([100 / 3, 200 / 3])
    # a smaller batch (a stream's last): the share rounded up, so at least one image still goes on
    assert [spec.rerun_limit(0, n) for n in (6, 5, 3, 1)] == [4, 4, 2, 1]
    short = torch.tensor([[5, 4, 3]])
    assert exit_stages(records, spec, short).tolist() == [[1, 0, 1]]  # 5 and 3 the least confident of the three
    out = CascadeRunner(table_stages(CAP_LOGITS), spec)(short[0].float()[:, None])
    assert out.stage.tolist() == [1, 0, 1] and out.batch_sizes == [3, 2]
    # a cap of 0: nothing goes on; a cap of 1 changes nothing
    assert exit_stages(records, CascadeSpec((3, 12), 'entropy', (0.01,), rerun_cap=(0.,)), batches).sum() == 0
    assert torch.equal(exit_stages(records, CascadeSpec((3, 12), 'entropy', (0.01,), rerun_cap=(1.,)), batches),
                       exit_stages(records, uncapped, batches))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: the mask is built on the values\' device')
def test_rerun_cap_on_cuda_equals_the_cpu():
    values = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    stay = values > 0.3
    expected = cap_reruns(values, 'entropy', stay, 2)
    assert torch.equal(cap_reruns(values.cuda(), 'entropy', stay.cuda(), 2).cpu(), expected)


def test_rerun_cap_is_refused_without_batches_and_when_malformed():
    records = records_of(CAP_LOGITS, CAP_TARGET)
    with pytest.raises(ValueError, match=r'^3->12 entropy<=0\.01 rerun<=0\.5: a re-run cap depends on which images '
                                         r'share a batch; pass batches$'):
        evaluate_cascade(records, CascadeSpec((3, 12), 'entropy', (0.01,), rerun_cap=(0.5,)), {3: 1., 12: 1.})
    for cap in [(0.5, 0.5), (1.5,), (-0.1,)]:
        with pytest.raises(ValueError, match=r'^rerun_cap takes one share in \[0, 1\] per stage but the last \(1\)'):
            CascadeSpec((3, 12), 'entropy', (0.01,), rerun_cap=cap)


def test_capped_three_stage_cascade_on_a_model_equals_the_offline_evaluation_batch_by_batch():
    model, images = small_model(), torch.randn(16, 3, 32, 32)
    full = {k: eager_stages(model, LADDER)[k](images) for k in LADDER}
    thresholds = two_thresholds(full, LADDER)
    records = records_of(full, torch.zeros(16, dtype=torch.long))
    batches = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8] for i in range(4)])
    uncapped = exit_stages(records, CascadeSpec(LADDER, 'entropy', thresholds), batches)
    assert (uncapped == 2).any() and ((uncapped >= 1).sum(1) > 1).any()
    # binding at stage 1 (one image of 8 goes on), binding at stage 2 (none reaches k=12), and not binding
    for cap, binds in [((0.125, 0.125), True), ((0.25, 0.), True), ((0.25, 0.125), False)]:
        spec = CascadeSpec(LADDER, 'entropy', thresholds, rerun_cap=cap)
        capped = exit_stages(records, spec, batches)
        assert bool((capped != uncapped).any()) == binds
        assert ((capped >= 1).sum(1) <= int(8 * cap[0])).all() and ((capped >= 2).sum(1) <= int(8 * cap[1])).all()
        for row, stages in zip(batches, capped, strict=True):
            out = CascadeRunner(eager_stages(model, LADDER), spec)(images[row])
            assert out.stage.tolist() == stages.tolist()
            assert out.batch_sizes == [8] + [int((stages >= s).sum()) for s in (1, 2) if (stages >= s).any()]
            for position, (i, s) in enumerate(zip(row.tolist(), out.stage.tolist(), strict=True)):
                assert torch.allclose(out.logits[position], full[LADDER[s]][i], atol=1e-5)


# --- buckets --------------------------------------------------------------------------------------------------------
def test_bucket_padding_runs_bucket_shapes_and_drops_the_padding():
    seen = []

    def stage(k):
        def run(x):
            seen.append((k, x[:, 0].tolist()))
            return HAND[k][x[:, 0].long() % 4]
        return run
    images = torch.tensor([[0.], [1.], [2.], [3.], [4.], [5.], [6.], [7.]])  # image i behaves as image i % 4
    out = CascadeRunner({k: stage(k) for k in LADDER}, CascadeSpec(LADDER, 'entropy', (0.5, 0.5)),
                        buckets=[8, 1, 4])(images)
    # 8 images at k=3 (a bucket); 1, 2, 5, 6 go on: 4 = a bucket; 2 and 6 go on: padded to 4 with copies of image 2
    assert seen == [(3, [0., 1., 2., 3., 4., 5., 6., 7.]), (6, [1., 2., 5., 6.]), (12, [2., 6., 2., 2.])]
    assert out.batch_sizes == [8, 4, 2]
    assert out.stage.tolist() == [0, 1, 2, 0] * 2
    assert out.logits.shape == (8, 3)
    assert torch.equal(out.logits[6], HAND[12][2])


def test_bucket_size_and_default_buckets():
    assert bucket_size(3, [1, 2, 4, 8]) == 4 and bucket_size(4, [8, 4]) == 4 and bucket_size(5, None) == 5
    with pytest.raises(ValueError, match=r'^a sub-batch of 9 images fits none of the buckets \[1, 2, 4, 8\]$'):
        bucket_size(9, [8, 4, 2, 1])
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert default_buckets(1) == [1]


class StubGraphs:
    """A ``GraphBackend`` without CUDA: 'replay' reruns the captured call into the static output."""

    def __init__(self):
        self.captures = 0

    def capture(self, fn, warmup):
        for _ in range(warmup):
            fn()
        self.captures += 1
        out = fn()
        return (lambda: out.copy_(fn())), out


def test_graph_stages_capture_every_k_and_bucket_and_answer_as_eager():
    model = small_model()
    images = torch.randn(8, 3, 32, 32)
    backend = StubGraphs()
    stages, buckets = graph_stages(model, LADDER, images, backend=backend, warmup=1)
    assert buckets == [1, 2, 4, 8] and backend.captures == len(LADDER) * 4
    with pytest.raises(ValueError, match=r'^no CUDA graph of k=6 for a batch of 3: pad to one of the buckets '):
        stages[6](images[:3])
    full = {k: eager_stages(model, LADDER)[k](images) for k in LADDER}
    spec = CascadeSpec(LADDER, 'entropy', (gap_threshold(confidence(full[3], 'entropy')),) * 2)
    graphed = graph_cascade(model, spec, images, backend=StubGraphs(), warmup=1)(images)
    eager = CascadeRunner(eager_stages(model, LADDER), spec)(images)
    assert torch.equal(graphed.stage, eager.stage) and graphed.batch_sizes == eager.batch_sizes
    assert torch.allclose(graphed.logits, eager.logits, atol=1e-5)


def test_graph_stages_refuse_the_cpu():
    with pytest.raises(ValueError, match=r'^CUDA graphs need a CUDA device, got cpu$'):
        graph_stages(small_model(), LADDER, torch.randn(2, 3, 32, 32))


# --- exact equality with the per-k answers (eager, ONNX) ------------------------------------------------------------
def check_selected(out, full: dict, ladder, spec) -> None:
    """The runner's stages are those the full-batch per-k logits give (``exit_stages``) and each answer is that
    stage's per-k answer."""
    target = torch.zeros(out.stage.numel(), dtype=torch.long)
    assert out.stage.tolist() == exit_stages(records_of(full, target), spec).tolist()
    selected = torch.stack([full[ladder[s]][i] for i, s in enumerate(out.stage.tolist())])
    assert torch.equal(out.logits.argmax(1), selected.argmax(1))
    assert torch.allclose(out.logits, selected, atol=1e-5)


def two_thresholds(full: dict, ladder) -> tuple:
    """Per-stage thresholds in wide gaps: stage 1 on all images, stage 2 on those stage 1 keeps."""
    first = gap_threshold(confidence(full[ladder[0]], 'entropy'))
    if len(ladder) == 2:
        return (first,)
    kept = confidence(full[ladder[0]], 'entropy') > first
    return first, gap_threshold(confidence(full[ladder[1]][kept], 'entropy'))


def test_eager_cascade_equals_the_per_k_answers_it_selected():
    model, images = small_model(), torch.randn(16, 3, 32, 32)
    full = {k: eager_stages(model, LADDER)[k](images) for k in LADDER}
    spec = CascadeSpec(LADDER, 'entropy', two_thresholds(full, LADDER))
    out = CascadeRunner(eager_stages(model, LADDER), spec)(images)
    assert set(out.stage.tolist()) == {0, 1, 2}  # every stage answers some image
    check_selected(out, full, LADDER, spec)


def test_onnx_cascade_equals_the_per_k_answers_it_selected(tmp_path):
    from hydravit.deploy.onnx import export_onnx
    model, images, ladder = small_model(), torch.randn(12, 3, 32, 32), (3, 6)
    for k in ladder:
        export_onnx(model, k, tmp_path / f'k{k}.onnx', (3, 32, 32))
    stages = onnx_stages(tmp_path, ladder)
    full = {k: stages[k](images) for k in ladder}
    spec = CascadeSpec(ladder, 'entropy', two_thresholds(full, ladder))
    out = CascadeRunner(stages, spec)(images)
    assert set(out.stage.tolist()) == {0, 1} and out.batch_sizes[1] < 12
    check_selected(out, full, ladder, spec)
    eager = CascadeRunner(eager_stages(model, ladder), spec)(images)
    # onnxruntime's kernels sum in another order than PyTorch's (and pick kernels by CPU): the same answers, logits
    # within 3e-4 of their scale (~10 here; 1.3e-3 seen on one machine; a wrong width is off by ~1)
    assert torch.equal(out.stage, eager.stage)
    assert (out.logits - eager.logits).abs().max() <= 3e-4 * eager.logits.abs().max()
    with pytest.raises(ValueError, match=r'k6\.onnx holds the k=6 subnetwork, not k=3$'):
        onnx_stages({3: tmp_path / 'k6.onnx'}, [3])
    with pytest.raises(FileNotFoundError, match=r'^no ONNX file for k=12: .*k12\.onnx$'):
        onnx_stages(tmp_path, (3, 12))


def test_compiled_cascade_answers_as_eager_across_sub_batch_sizes():
    """torch.compile per k (dynamo's ``eager`` backend: the graphs and guards without inductor's C++ build): each k
    gets its own graph, and every k and sub-batch size answers as the eager model."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, images, ladder = small_model(), torch.randn(16, 3, 32, 32), (3, 6)
    full = {k: eager_stages(model, ladder)[k](images) for k in ladder}
    spec = CascadeSpec(ladder, 'entropy', two_thresholds(full, ladder))
    out = CascadeRunner(compiled_stages(model, ladder, backend='eager'), spec)(images)
    assert out.batch_sizes[1] < 16 and counters['stats']['unique_graphs'] >= 2  # compiled, not run eagerly
    check_selected(out, full, ladder, spec)
    torch._dynamo.reset()


# --- offline evaluation against a real run --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
    """3 classes x 6 random 32x32 images."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('cascade_images')
    rng = np.random.default_rng(1)
    for c in ('a', 'b', 'c'):
        (root / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
    return root


def folder_loader(root, model):
    """The loader validate.py builds: the model's preprocessing, batches of 5 (the last one short)."""
    cfg = resolve_data_config({}, model=model)
    dataset = create_dataset('', root=str(root), split='validation', is_training=False)
    return create_loader(dataset, input_size=cfg['input_size'], batch_size=5, use_prefetcher=False, num_workers=0,
                         interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
                         crop_pct=cfg['crop_pct'], crop_mode=cfg['crop_mode'])


def test_offline_evaluation_equals_a_real_cascade_run(digits_folder):
    model = small_model(num_classes=3)
    loader = folder_loader(digits_folder, model)
    records = collect_records(model, loader, LADDER, torch.device('cpu'))
    first = gap_threshold(records.scores['entropy'][3])
    kept = records.scores['entropy'][3] > first
    spec = CascadeSpec(LADDER, 'entropy', (first, gap_threshold(records.scores['entropy'][6][kept])))
    runner = CascadeRunner(eager_stages(model, LADDER), spec)
    stages, correct, ran = [], [], torch.zeros(3)
    for images, target in loader:
        out = runner(images)
        stages += out.stage.tolist()
        correct += (out.logits.argmax(1) == target).tolist()
        ran += torch.tensor(out.batch_sizes + [0] * (3 - len(out.batch_sizes)), dtype=torch.float)
    assert stages == exit_stages(records, spec).tolist() and len(set(stages)) > 1
    gmacs = {3: 1., 6: 10., 12: 100.}
    result = evaluate_cascade(records, spec, gmacs)
    assert result.top1 == pytest.approx(100. * sum(correct) / len(correct))
    # the images each stage really ran, priced per k
    assert result.mean_gmacs == pytest.approx(float(ran @ torch.tensor([1., 10., 100.])) / len(stages))


# --- validate.py --cascade --------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory):
    """A checkpoint recording its trained head set (3 6 12), as hydravit.train writes it."""
    path = tmp_path_factory.mktemp('cascade_ckpt') / 'model_best.pth.tar'
    torch.save({'arch': SMALL, 'state_dict': small_model(num_classes=3).state_dict(), 'heads': list(LADDER)}, path)
    return path


def validate_argv(folder, checkpoint, *extra):
    return [str(folder), '--checkpoint', str(checkpoint), '--device', 'cpu', '-j', '0', '-b', '5', *extra]


def test_validate_cascade_rows_and_results_file(digits_folder, trained_checkpoint, tmp_path, capsys):
    out = tmp_path / 'r.json'
    rows = accuracy.main(validate_argv(digits_folder, trained_checkpoint, '--cascade', *map(str, LADDER),
                                       '--exit-entropy', '0.9', '1.05', '--results-file', str(out),
                                       '--plot', str(tmp_path / 'sweep.png')))
    printed = capsys.readouterr().out
    assert [(r['policy'], r['ladder'], r['threshold']) for r in rows] == [
        ('cascade', '3->6->12', 0.9), ('cascade', '3->6->12', 1.05), ('fixed', '3', None), ('fixed', '6', None),
        ('fixed', '12', None)]
    # independently: the records of the same weights on the same images, GMACs from DeepSpeed per k
    model = small_model(num_classes=3)
    records = collect_records(model, folder_loader(digits_folder, model), LADDER, torch.device('cpu'))
    gmacs = {k: profile_heads(model, k, (3, 32, 32))['gmacs'] for k in LADDER}
    for row, t in zip(rows[:2], (0.9, 1.05), strict=True):
        stage = exit_stages(records, CascadeSpec(LADDER, 'entropy', (t, t)))
        pred = torch.stack([records.pred[k] for k in LADDER])[stage, torch.arange(18)]
        assert row['top1'] == pytest.approx(100. * float((pred == records.target).float().mean()), abs=1e-4)
        assert [row[f'stage{s + 1}_share'] for s in range(3)] == pytest.approx(
            [100. * float((stage == s).float().mean()) for s in range(3)], abs=1e-4)
        ran = [float((stage >= s).float().mean()) for s in range(3)]
        assert row['gmacs'] == pytest.approx(sum(r * gmacs[k] for r, k in zip(ran, LADDER, strict=True)), rel=1e-5)
    for row, k in zip(rows[2:], LADDER, strict=True):
        assert row['gmacs'] == pytest.approx(gmacs[k], rel=1e-5)
        assert row['top1'] == pytest.approx(100. * float(records.correct(k).float().mean()), abs=1e-4)
        assert row['stage1_heads'] == k and row['stage1_share'] == 100. and row['stage2_heads'] is None
    written = json.loads(out.read_text())
    assert [{key: r[key] for key in summary_keys(3)} for r in written] == [
        {key: r[key] for key in summary_keys(3)} for r in rows]
    assert 'policy   ladder' in printed and (tmp_path / 'sweep.png').read_bytes()[:4] == b'\x89PNG'


def test_validate_cascade_aliases_max_prob_and_csv(digits_folder, trained_checkpoint, tmp_path, capsys):
    base = validate_argv(digits_folder, trained_checkpoint)
    named = accuracy.main([*base, '--cascade', '3', '12', '--exit-entropy', '1.0'])
    alias = accuracy.main([*base, '--thinking-stages', '3', '12', '--threshold', '1.0'])
    assert named == alias and list(named[0])[:len(summary_keys(2))] == list(summary_keys(2))
    out = tmp_path / 'r.csv'
    rows = accuracy.main([*base, '--cascade', '3', '6', '--exit-max-prob', '0.4', '--results-file', str(out)])
    assert rows[0]['rule'] == 'max_prob' and [r['ladder'] for r in rows] == ['3->6', '3', '6', '12']
    assert [r['top1'] for r in read_results(out)] == [r['top1'] for r in rows]
    capsys.readouterr()


CASCADE = '--cascade/--thinking-stages'


@pytest.mark.parametrize('extra, line', [
    (['--cascade', '6', '3', '--exit-entropy', '1'], f'{CASCADE}: head counts must be strictly increasing, got 6 3'),
    (['--cascade', '3', '3', '--exit-entropy', '1'], f'{CASCADE}: head counts must be strictly increasing, got 3 3'),
    (['--thinking-stages', '1', '3', '6', '12', '--threshold', '1'],
     f'{CASCADE}: a cascade is 2 or 3 head counts, got 4 (1 3 6 12)'),
    (['--cascade', '6', '--threshold', '1'], f'{CASCADE}: a cascade is 2 or 3 head counts, got 1 (6)'),
    (['--cascade', '3', '6'], f'{CASCADE}: needs thresholds: --exit-entropy T [T ...] or --exit-max-prob T [T ...]'),
    (['--exit-entropy', '1'], f'--exit-entropy/--threshold: needs {CASCADE} K1 K2 [K3] (the ladder the thresholds '
                              'apply to)'),
    (['--exit-max-prob', '0.5'], f'--exit-max-prob: needs {CASCADE} K1 K2 [K3] (the ladder the thresholds apply to)'),
    (['--cascade', '3', '6', '--exit-entropy', '1', '--exit-max-prob', '0.5'],
     '--exit-entropy/--threshold and --exit-max-prob: give one exit rule, not both'),
    (['--cascade', '3', '6', '--threshold', '0.5', 'nan'], '--exit-entropy/--threshold: thresholds must be finite, '
                                                           'got nan'),
    (['--cascade', '3', '6', '--exit-max-prob', 'inf'], '--exit-max-prob: thresholds must be finite, got inf'),
    (['--cascade', '3', '6', '--exit-entropy', '-0.5'],
     '--exit-entropy/--threshold: an entropy threshold is >= 0 nats (below 0 no image exits), got -0.5'),
    (['--cascade', '3', '6', '--exit-max-prob', '1.5'],
     '--exit-max-prob: a top-1 probability threshold is in [0, 1], got 1.5'),
    (['--plot', 'x.png'], '--plot: needs --cascade (it plots the threshold sweep against the fixed k)'),
    (['--cascade', '3', '6', '--exit-entropy', '1', '--plot', 'x.txt'],
     '--plot: FILE must end in .png, .pdf or .svg, got x.txt'),
])
def test_validate_cascade_bad_input_is_one_line_naming_the_flag(extra, line, digits_folder, trained_checkpoint,
                                                                capsys):
    err = expect_exit(validate_argv(digits_folder, trained_checkpoint, *extra), capsys)
    assert err.endswith(f'error: {line}\n') and not err.startswith('Traceback')


def test_validate_cascade_refuses_an_untrained_k(digits_folder, trained_checkpoint, capsys):
    err = expect_exit(validate_argv(digits_folder, trained_checkpoint, '--cascade', '3', '5', '--exit-entropy', '1'),
                      capsys)
    assert err.endswith(f'error: {CASCADE}: k=5 not among the head counts {trained_checkpoint} was trained on '
                        '(3 6 12)\n')
    err = expect_exit([str(digits_folder), '--model', SMALL, '--num-classes', '3', '--device', 'cpu', '-j', '0',
                       '--cascade', '3', '13', '--exit-entropy', '1'], capsys)
    assert err.endswith(f'error: {CASCADE}: heads must be an int in 1..12, got 13\n')  # random weights: any k runs
