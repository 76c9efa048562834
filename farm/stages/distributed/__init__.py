"""Data-parallel plumbing of the quantize stage: ranks that each read a share of the checkpoint
(`split_load`), write a share of the shards (`split_save`) and calibrate on a share sized to even out their work
(`rank_shares`)."""
