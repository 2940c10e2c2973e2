"""cil's Hydra launcher on Ray (`hydra/launcher=ray`, cil/conf/hydra/launcher/ray.yaml): see ray_launcher.py."""
