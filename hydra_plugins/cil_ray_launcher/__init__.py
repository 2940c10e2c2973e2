"""cil's Hydra launcher on Ray (`hydra/launcher=ray`, conf/hydra/launcher/ray.yaml): see ray_launcher.py."""
