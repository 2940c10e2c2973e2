"""The MKD knobs MKDPlugin does not take, with the reason (no avalanche import: validate() reads them)."""

# MKD knobs that are not options of MKDPlugin (cil/avalanche/mkd_plugin.py), with the reason; `addon.mkd.<key>`
# away from its default is refused for a peer run. `mode` is accepted as main_pass: the form the plugin runs.
MKD_NOT_OPTIONS = {
    "mode": "the plugin always distils on the strategy's own forward pass (mode=main_pass)",
    "replay_batch_size": "the block form draws from our learner's replay buffer, which a strategy does not have",
    "augment": "the block form's augmentation; in Avalanche the strategy's data loader owns augmentation",
    "crop_scale": "the block form's augmentation; in Avalanche the strategy's data loader owns augmentation",
    "raw_pass": "the strategy's loader augments before the plugin sees mb_x, so there is no raw batch to distil on",
}
