"""``make demo``: the paper's whole protocol in miniature, on CPU, through the real entry points.

    python -m demo.run            # full demo (~35-39 min on 2 cores) -> results/demo/report.md
    python -m demo.run --quick    # same stages at tiny scale (minutes)

Stages (each a child process running the same command a full-scale user runs; only the configs
under ``configs/demo/`` differ): data -> supervised baseline, MoCo v2 and MoCo v1 pretraining ->
raw-pixel kNN reference -> kNN and linear evaluation of every backbone (random init, supervised,
MoCo v1, MoCo v2) -> conversion to Detectron2 -> a check that the detector holds every pretrained
tensor -> Faster R-CNN C4 fine-tuning + VOC-style AP on the demo scenes -> report. Independent stages
(the pretrainings, the evaluations, the fine-tunings) run ``--jobs`` at a time. A stage whose output
exists is skipped, so rerunning after a crash continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

from demo import data as demo_data
from demo.plan import CONFIG_DIRS, PRETRAIN_THREADS, ROW_TITLES, ROWS, Plan
from demo.stages import (
    Runner,
    Stage,
    detectron2_progress,
    epoch_progress,
    fmt_seconds,
    probe_progress,
    two_pass_progress,
)
from moco_d2.core.errors import exit_on_user_error


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _pretrain_epochs(config_file: str) -> int:
    from moco_d2.core.config import load_config, pretrain_defaults

    return int(load_config(pretrain_defaults(), config_file).SOLVER.EPOCHS)


def _run_opts(out: Path, seed: str) -> list[str]:
    """The overrides every training stage ends with: its output dir, the demo's seed, resume if interrupted."""
    return ["OUTPUT_DIR", str(out), "SEED", seed, "RESUME", "auto"]


def _lincls_epochs(config_file: str) -> int:
    from moco_d2.core.config import load_config
    from moco_d2.evaluation.lincls import lincls_defaults

    return int(load_config(lincls_defaults(), config_file).SOLVER.EPOCHS)


def _max_iter(config_file: str) -> int:
    from detection.config import load_detection_config

    return int(load_detection_config(config_file).SOLVER.MAX_ITER)


def _lincls_summary(out: Path) -> str:
    from demo.report import lincls_curve

    top1 = _json(out / "results.json")["top1"]
    curve = lincls_curve(out / "metrics.jsonl")
    if len(curve) < 3:
        return f"top-1 {top1:.2f} %"
    marks = sorted({1, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve)})
    shown = ", ".join(f"{e}: {curve[e - 1]:.1f}" for e in marks)
    return f"top-1 {top1:.2f} % (val top-1 after epoch {shown})"


def _pretrain_summary(out: Path) -> str:
    from demo.report import pretrain_curves

    c = pretrain_curves(out / "metrics.jsonl")
    text = f"{c['epochs']} epochs, loss {c['loss'][-1]:.3f}, contrastive acc {c['acc1'][-1]:.1f} %"
    if c["knn"]:
        text += ", kNN monitor top-1 " + " -> ".join(f"{v:.1f}" for v in c["knn"]) + " %"
    return text


# Long on purpose (223 lines): the demo's stages, declared in the order they run, one literal each (so the
# kNN and linear stages' literals look alike by design);
# splitting the list would scatter the plan a reader follows top to bottom.
def build_stages(plan: Plan) -> list[Stage]:
    """Every stage of the demo, in order."""
    w, data, seed = plan.work, plan.data, str(plan.seed)
    imagefolder = str(data.imagefolder)
    spec = dataclasses.replace(demo_data.PRESETS[plan.preset], seed=plan.seed)
    quick = {"full": "", "quick": " --quick", "smoke": " --preset smoke"}[plan.preset]
    stages = [
        Stage(
            "data",
            "prepare Fashion-MNIST ImageFolder + VOC-format scenes",
            data.manifest,
            func=lambda: demo_data.prepare(data.root, spec, log=lambda *_: None),
            summary=lambda: "{imagefolder_train} train / {imagefolder_val} val images, "
            "{voc_trainval_images} trainval / {voc_test_images} test scenes".format(
                **_json(data.manifest)["counts"]
            ),
            display=f"python -m demo.data{quick} --seed {seed} --root {data.root}",
            is_done=lambda: demo_data.is_prepared(data.root, spec),
        ),
        Stage(
            "random_init",
            f"random-init {plan.arch} (torchvision's initialisation, seeded)",
            plan.backbone("random_init"),
            func=lambda: _random_init(plan),
            display=f"(in demo.run) torch.manual_seed({seed}); moco_d2.core.backbone.build_resnet({plan.arch!r}).state_dict()",
        ),
    ]
    # The three pretrainings run side by side; the supervised one (the shortest) first, so the tail that
    # runs alone is a MoCo run, which keeps both cores busy (1 thread + 1 loader worker).
    sup_cfg = plan.config("supervised")
    stages.append(
        Stage(
            "supervised",
            "supervised pretraining on the labels",
            w / "supervised" / "results.json",
            argv=_python(
                "-m",
                "moco_d2.evaluation.lincls",
                "--config-file",
                sup_cfg,
                "DATA.ROOT",
                imagefolder,
                *_run_opts(w / "supervised", seed),
            ),  # fmt: skip
            progress=epoch_progress(_lincls_epochs(sup_cfg), first_epoch=1),
            summary=lambda: f"val top-1 {_json(w / 'supervised' / 'results.json')['top1']:.2f} %",
            concurrent="pretraining",
        )
    )
    for v in ("moco_v2", "moco_v1"):
        out = w / "pretrain" / v
        cfg = plan.config(v)
        stages.append(
            Stage(
                f"pretrain/{v}",
                f"{ROW_TITLES[v]} pretraining",
                out / "model_final.pth",
                argv=_python(
                    "-m",
                    "pretrain.train",
                    "--config-file",
                    cfg,
                    "DATA.ROOT",
                    imagefolder,
                    "KNN.TRAIN_ROOT",
                    str(data.imagefolder / "train"),
                    "KNN.VAL_ROOT",
                    str(data.imagefolder / "val"),
                    *_run_opts(out, seed),
                ),  # fmt: skip
                progress=epoch_progress(_pretrain_epochs(cfg), first_epoch=0),
                summary=lambda out=out: _pretrain_summary(out),
                threads=PRETRAIN_THREADS,
                concurrent="pretraining",
            )
        )
    stages.append(
        Stage(
            "raw_pixels",
            "raw-pixel kNN reference",
            w / "raw_pixels" / "knn_results.json",
            func=lambda: _raw_pixels(plan),
            summary=lambda: f"top-1 {_json(w / 'raw_pixels' / 'knn_results.json')['top1']:.2f} %",
            display=f"(in demo.run) weighted kNN on raw pixels of {imagefolder}",
        )
    )
    for row in ROWS:
        out = w / "knn" / row
        stages.append(
            Stage(
                f"knn/{row}",
                f"kNN evaluation: {ROW_TITLES[row]}",
                out / "knn_results.json",
                argv=_python(
                    "-m",
                    "moco_d2.evaluation.knn",
                    "--config-file",
                    plan.config("knn"),
                    "MODEL.WEIGHTS",
                    str(plan.backbone(row)),
                    "DATA.ROOT",
                    imagefolder,
                    "DATA.FEATURES_CACHE",
                    str(plan.frozen_features(row)),
                    "OUTPUT_DIR",
                    str(out),
                ),  # fmt: skip
                progress=two_pass_progress(),
                summary=lambda out=out: f"top-1 {_json(out / 'knn_results.json')['top1']:.2f} %",
                concurrent="evaluation",
            )
        )
    lin_cfg = plan.config("lincls")
    for row in ROWS:
        out = w / "lincls" / row
        stages.append(
            Stage(
                f"lincls/{row}",
                f"linear evaluation: {ROW_TITLES[row]}",
                out / "results.json",
                argv=_python(
                    "-m",
                    "moco_d2.evaluation.lincls",
                    "--config-file",
                    lin_cfg,
                    "MODEL.WEIGHTS",
                    str(plan.backbone(row)),
                    "DATA.ROOT",
                    imagefolder,
                    "DATA.FEATURES_CACHE",
                    str(plan.frozen_features(row)),
                    *_run_opts(out, seed),
                ),  # fmt: skip
                progress=probe_progress(),
                summary=lambda out=out: _lincls_summary(out),
                concurrent="evaluation",
                after=f"knn/{row}",  # reads the features the kNN stage extracted
            )
        )
    det_cfg, det_rand = plan.config("voc_c4"), plan.config("voc_c4_random_init")
    for row in (r for r in ROWS if r != "random_init"):  # converted weights, checked in the detector
        pkl = w / "convert" / f"{row}.pkl"
        stages.append(
            Stage(
                f"convert/{row}",
                f"convert to Detectron2: {ROW_TITLES[row]}",
                pkl,
                argv=_python("-m", "convert", str(plan.backbone(row)), str(pkl)),
                summary=lambda pkl=pkl: f"{pkl} ({pkl.stat().st_size / 2**20:.1f} MiB)",
            )
        )
        check_json = w / "detection" / f"transfer_check_{row}.json"
        stages.append(
            Stage(
                f"transfer/{row}",
                f"check every pretrained tensor reaches the detector: {ROW_TITLES[row]}",
                check_json,
                func=lambda row=row, pkl=pkl, check_json=check_json: _check_transfer(
                    plan, row, pkl, check_json
                ),
                summary=lambda check_json=check_json: "{tensors_identical} tensors identical "
                "({backbone_tensors} backbone + {res5_tensors} res5)".format(**_json(check_json)),
                display=f"(in demo.run) demo.transfer.check_transfer({plan.backbone(row)}, {pkl}, {det_cfg})",
            )
        )
    for row in ROWS:
        cfg, weights = (
            (det_rand, [])
            if row == "random_init"
            else (det_cfg, ["MODEL.WEIGHTS", str(w / "convert" / f"{row}.pkl")])
        )
        for det_seed in plan.detection_seeds(row):
            out = plan.detection_dir(row, det_seed)
            suffix = "" if det_seed == plan.seed else f" (seed {det_seed})"
            stages.append(
                Stage(
                    f"detection/{out.name}",
                    f"Faster R-CNN C4 fine-tuning + eval: {ROW_TITLES[row]}{suffix}",
                    out / "metrics.json",
                    argv=_python(
                        "detection/train_net.py",
                        "--config-file",
                        cfg,
                        "--resume",
                        *weights,
                        "OUTPUT_DIR",
                        str(out),
                        *plan.detection_opts(det_seed),
                    ),  # fmt: skip
                    progress=detectron2_progress(_max_iter(cfg)),
                    short_spin=True,  # the detector's many small ops: 1.4-1.6x faster, same AP
                    summary=lambda out=out: "AP50 {AP50:.1f}, AP {AP:.1f}, AP75 {AP75:.1f}".format(
                        **_json(out / "metrics.json")
                    ),
                    concurrent="detection",
                )
            )
    ranks = w / "features" / "ranks.json"
    stages.append(
        Stage(
            "features",
            "effective rank of each backbone's res4 / res5 features on the test scenes",
            ranks,
            func=lambda: _feature_ranks(plan, ranks),
            summary=lambda: ", ".join(
                f"{ROW_TITLES[r]} {v['res4']['effective_rank']:.1f}" for r, v in _json(ranks)["rows"].items()
            )
            + " (res4)",
            display=f"(in demo.run) demo.diagnostics.write_feature_ranks(... {data.voc}, {ranks})",
        )
    )
    grid = w / "detections.png"  # copied next to the report by demo.report
    stages.append(
        Stage(
            "scenes",
            "draw test scenes with the MoCo v2 detector's boxes",
            grid,
            func=lambda: _scene_grid(plan, grid),
            display=f"(in demo.run) demo.visualize.scene_grid(... {w / 'detection' / 'moco_v2' / 'model_final.pth'})",
        )
    )
    return stages


def _random_init(plan: Plan) -> None:
    from demo.baselines import write_random_init

    write_random_init(plan.backbone("random_init"), plan.arch, plan.seed)


def _raw_pixels(plan: Plan) -> None:
    from demo.baselines import raw_pixel_knn
    from moco_d2.core.config import load_config
    from moco_d2.evaluation.knn import knn_defaults

    knn = load_config(knn_defaults(), plan.config("knn")).KNN
    raw_pixel_knn(plan.data.imagefolder, knn.K, knn.T, plan.work / "raw_pixels" / "knn_results.json")


def _check_transfer(plan: Plan, row: str, pkl: Path, out_json: Path) -> None:
    from demo.transfer import check_transfer

    check_transfer(str(plan.backbone(row)), str(pkl), plan.config("voc_c4"), plan.detection_opts(), out_json)


def _feature_ranks(plan: Plan, out_json: Path) -> None:
    from demo.diagnostics import write_feature_ranks
    from detection.config import load_detection_config

    size = int(load_detection_config(plan.config("voc_c4")).INPUT.MIN_SIZE_TEST)
    backbones = {row: plan.backbone(row) for row in ROWS}
    write_feature_ranks(backbones, plan.arch, plan.data.voc, out_json, size=size)


def _scene_grid(plan: Plan, out_png: Path) -> None:
    from demo.visualize import scene_grid

    weights = plan.work / "detection" / "moco_v2" / "model_final.pth"
    scene_grid(plan.config("voc_c4"), plan.detection_opts(), str(weights), plan.data.voc, out_png)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def make_plan(args: argparse.Namespace) -> Plan:
    preset = demo_data.resolve_preset(args.quick, args.preset)
    work = args.work or Path("results/demo/work") / preset
    report_dir = args.report_dir or (Path("results/demo") if preset == "full" else work)
    data = demo_data.DemoData(args.data_root or demo_data.default_root(preset))
    return Plan(preset, args.seed, data, work, report_dir, threads=args.threads, jobs=args.jobs)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the whole MoCo v2 protocol in miniature on Fashion-MNIST (CPU)."
    )
    p.add_argument("--quick", action="store_true", help="tiny scale, a few minutes (make demo QUICK=1)")
    p.add_argument("--preset", choices=sorted(CONFIG_DIRS), help="scale (overrides --quick); smoke = tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="intra-op threads of a stage running alone (float32 results depend on it; default 2, as in the report)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="independent stages run side by side, each with threads/jobs threads (default 2, as in the report)",
    )
    p.add_argument("--work", type=Path, help="intermediate outputs (default results/demo/work/<preset>)")
    p.add_argument("--data-root", type=Path, help="prepared data (default datasets/demo[-<preset>])")
    p.add_argument(
        "--report-dir", type=Path, help="where report.md goes (default results/demo for the full demo)"
    )
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library chatter in this process only
    warnings.filterwarnings("ignore", category=UserWarning)
    # `kill` (SIGTERM) stops the running child too, like Ctrl-C; rerunning continues from there.
    signal.signal(signal.SIGTERM, _interrupt)
    plan = make_plan(args)
    stages = build_stages(plan)
    if not stages[0].finished() and (plan.work / "stages.json").is_file():
        # New or different data: every earlier output in the work dir is stale.
        print(f"demo: the data will be (re)built, so the old outputs in {plan.work} are removed", flush=True)
        shutil.rmtree(plan.work)
    plan.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(plan.work, total=len(stages) + 1, threads=plan.threads, jobs=plan.jobs)
    print(
        f"demo ({plan.preset}, seed {plan.seed}): {len(stages) + 1} stages; work dir {plan.work}", flush=True
    )
    start = time.time()
    runner.run_all(stages)
    from demo.report import write_report

    report = write_report(plan, stages, runner.records, time.time() - start)
    print(f"✓ [{len(stages) + 1}/{len(stages) + 1}] report: {report}", flush=True)
    print(f"demo finished in {fmt_seconds(time.time() - start)} (this invocation)", flush=True)


if __name__ == "__main__":
    main()
