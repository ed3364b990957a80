"""Train a diffusion UNet with a population-level preference objective.

python train.py fit --config configs/sdxl_popalign.yaml
python train.py fit --config configs/tiny.yaml --data.train_shards runs/tiny/shards
python train.py fit --help
"""

import sys

try:
    from popalign.train_cli import cli_main  # seconds: lightning, torch and diffusers load
except KeyboardInterrupt:  # Ctrl-C before cli_main can answer it
    print("train.py: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    cli_main()
