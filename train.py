"""Train a diffusion UNet with a population-level preference objective.

python train.py fit --config configs/sdxl_popalign.yaml
python train.py fit --config configs/tiny.yaml --data.train_shards runs/tiny/shards
python train.py fit --help
"""

from popalign.train_cli import cli_main

if __name__ == "__main__":
    cli_main()
