"""Assemble a cascade folder from separately trained stages: a text-to-image pipeline, then super-resolution
stages (trained with ``stage=super_resolution``), with each stage's sampling defaults.

    python -m ldm.cascade --base runs/my-base/pipeline --stage runs/my-sr/pipeline --noise-level 100 \\
        --steps 20 --out runs/my-cascade
    python -m ldm.generate --pipeline runs/my-cascade "a prompt"
"""

from __future__ import annotations

import argparse

from ldm.engine.errors import user_errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the text-to-image pipeline folder")
    parser.add_argument("--stage", action="append", required=True,
                        help="a super-resolution pipeline folder; repeat for more stages, in order")
    parser.add_argument("--noise-level", type=int, nargs="+", default=[20],
                        help="augmentation level at sampling, one for all stages or one per stage")
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="sampling steps, one or one per stage")
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[1.0],
                        help="the stages' guidance scale, one or one per stage")
    parser.add_argument("--out", required=True)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        from pipelines import CascadePipeline
        from pipelines.cascade import _per_stage

        n = len(args.stage)
        values = [_per_stage(name, v[0] if len(v) == 1 else v, n, []) for name, v in
                  (("--noise-level", args.noise_level), ("--steps", args.steps),
                   ("--guidance-scale", args.guidance_scale))]
        defaults = [{"noise_level": a, "num_inference_steps": b, "guidance_scale": c} for a, b, c in zip(*values)]
        CascadePipeline.from_stages(args.base, args.stage, defaults).save_pretrained(args.out)
        print(f"wrote the cascade {args.out} (base + {n} super-resolution stage(s))")


if __name__ == "__main__":
    main()
