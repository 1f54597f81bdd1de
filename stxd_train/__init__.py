"""Stage two of stxd: camera students trained with STXD distillation from the teacher cache."""
