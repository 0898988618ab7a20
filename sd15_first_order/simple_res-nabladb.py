"""Training entry point (upstream's name): residual ∇-DB "Pruned Baseline" and RSM "Ours" on SD1.5, Figure 5(c, d).

    torchrun --nproc_per_node=4 --master_port=29501 simple_res-nabladb.py --config config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml
    torchrun --nproc_per_node=4 --master_port=29501 simple_res-nabladb.py --config config/simple_res-nabladb_sd_hps.yaml
    python simple_res-nabladb.py --config config/simple_res-nabladb_sd_hps.yaml --tiny      # CPU, tiny kit

`python simple_res-nabladb.py --help` lists the flags; the loop is sd15fo/trainer.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the component root: the sd15fo package

from sd15fo.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
