from trainer.models.mmdit import MMDiT, build_mmdit, count_params, expected_param_count

__all__ = ["MMDiT", "build_mmdit", "count_params", "expected_param_count"]
