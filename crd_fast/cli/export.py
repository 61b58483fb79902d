"""``crd-fast export``: a model file to ONNX (the whole detector, or the head alone) via crd_fast.deploy."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .options import command, echo, positive_int

EPILOG = """\
what is written:
  OUT.onnx        whole detector: input "images" (batch, 3, crop, crop), normalised with ImageNet mean/std;
                  outputs "image_scores" (batch), "anomaly_maps" (batch, crop, crop), "patch_maps".
                  With --head-only: one input per backbone layer (its feature map), outputs
                  "image_scores" and "patch_maps" (for users who run their own backbone).
  OUT.onnx.json   metadata: config, sizes, threshold, training score statistics, SHA-256 of the ONNX file.
Only standard ONNX operators are used (no custom ops); the batch axis is dynamic. Run it without torch:
  python -c "from crd_fast.deploy import OnnxDetector as D; print(D('model.onnx').predict('images/').image_scores)"

examples:
  crd-fast export model.crd -o model.onnx
  crd-fast export model.crd -o head.onnx --head-only
  crd-fast export model.crd -o small.onnx --half --rank 256   (fp16 head weights, rank-256 projection)
  crd-fast export model.crd -o int8.onnx --int8 train/good     (int8 backbone, calibrated on the training images)
"""


def register(sub: Any) -> None:
    with command(
        sub,
        "export",
        epilog=EPILOG,
        run=run,
        help="export a model file to ONNX (whole detector or head only)",
        description="Export a fitted model to ONNX for onnxruntime, TensorRT, OpenVINO and similar "
        "runtimes. The exporter checks the written graph against PyTorch on a random input "
        "before writing.",
    ) as p:
        p.add_argument("model", metavar="MODEL", help="model file from 'crd-fast fit'")
        p.add_argument(
            "-o",
            "--output",
            required=True,
            metavar="OUT",
            help="file to write: model.onnx, or model.xml with --format openvino",
        )
        p.add_argument(
            "--format",
            choices=("onnx", "openvino"),
            default="onnx",
            help="onnx (default), or openvino: OpenVINO IR (OUT.xml + OUT.bin + OUT.xml.json, float32 "
            "weights; needs crd-fast[openvino]), run with crd_fast.deploy.openvino.OpenVinoDetector",
        )
        p.add_argument("--head-only", action="store_true", help="export only the CRD head: feature maps in, scores out")
        p.add_argument(
            "--half",
            action="store_true",
            help="store the head's matrix in float16 (half the size; small score error, computed in float32)",
        )
        p.add_argument(
            "--rank",
            type=positive_int,
            metavar="R",
            help="export the rank-R projection (fewer multiply-adds; error bound in the metadata)",
        )
        p.add_argument(
            "--int8",
            metavar="IMAGES",
            help="quantize the backbone to int8 (onnxruntime static quantization, for processors without "
            "bf16), calibrated on IMAGES (a folder of the training images); the head is refitted on the int8 "
            "backbone's features of all of IMAGES",
        )
        p.add_argument("--opset", type=positive_int, default=17, metavar="N", help="ONNX opset (default: 17)")
        p.add_argument(
            "--no-verify",
            dest="verify",
            action="store_false",
            help="skip the onnxruntime-vs-PyTorch check of the written graph",
        )


def outputs_of(args: argparse.Namespace) -> list[str]:
    """Every file the export writes: the model, its weights (OpenVINO) and its metadata sidecar."""
    from ..deploy.metadata import metadata_path_for

    files = [args.output]
    if args.format == "openvino":
        files.append(os.path.splitext(args.output)[0] + ".bin")
    return files + [os.fspath(metadata_path_for(args.output))]


def run(args: argparse.Namespace) -> int:
    from ..io.outputs import check_readable_file
    from ..io.safety import check_outputs

    check_readable_file(args.model, "model file")
    if args.format == "openvino" and not args.output.endswith(".xml"):
        raise ValueError(f"--format openvino writes OUT.xml (+ .bin): the output must end in .xml, got {args.output!r}")
    options = dict(
        head_only=args.head_only,
        opset=args.opset,
        precision="fp16" if args.half else "fp32",
        rank=args.rank,
        verify=args.verify,
    )
    if args.int8 and (args.head_only or args.half or args.rank or args.format == "openvino"):
        raise ValueError(
            "--int8 exports the whole detector to ONNX at full rank: it cannot be combined with "
            "--head-only, --half, --rank or --format openvino"
        )
    calibration = []
    if args.int8:
        from ..data import list_image_files

        calibration = [args.int8, *list_image_files(args.int8)] if os.path.isdir(args.int8) else [args.int8]
    # before the export, not after it: no output (sidecars included) may replace an input or a non-file
    check_outputs(files=outputs_of(args), inputs=[args.model, *calibration, args.config])
    if args.format == "openvino":
        from ..deploy.metadata import metadata_path_for
        from ..deploy.openvino import export_openvino

        meta = export_openvino(args.model, args.output, **options)
        written = os.path.splitext(args.output)[0] + ".bin"
        size = (os.path.getsize(args.output) + os.path.getsize(written)) / 2**20
        echo(
            f"crd-fast export: wrote OpenVINO IR {args.output} + {written} ({size:.2f} MiB) and "
            f"{metadata_path_for(args.output)}"
        )
    else:
        if args.int8:
            from ..deploy.quantize import export_onnx_int8

            result = export_onnx_int8(args.model, args.output, args.int8, opset=args.opset)
        else:
            from ..deploy import export_onnx

            result = export_onnx(args.model, args.output, **options)
        meta = result.metadata
        size = os.path.getsize(result.onnx_path) / 2**20
        echo(f"crd-fast export: wrote {result.onnx_path} ({size:.2f} MiB) and {result.metadata_path}")
    echo(
        f"  {'head only' if args.head_only else 'whole detector'}, opset {meta['opset']}, "
        + (
            f"int8 ({meta['quantization']['quantized']}), "
            if "quantization" in meta
            else f"head weights {meta['precision']}, "
        )
        + (f"rank {meta['rank']} of d = {meta.get('d')}" if meta.get("rank") else f"full rank (d = {meta.get('d')})")
        + (f" (score error bound {meta['error_bound']:.3g})" if meta.get("error_bound") else "")
    )
    for kind in ("inputs", "outputs"):
        echo(f"  {kind}: " + ", ".join(f"{x['name']} {tuple(x['shape'])}" for x in meta[kind]))
    return 0
