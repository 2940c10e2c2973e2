"""cil's Hydra launcher that trains a sweep's runs packed on one device (`hydra/launcher=packed`,
conf/hydra/launcher/packed.yaml): see packed_launcher.py."""
