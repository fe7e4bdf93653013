"""Running a job: a config's fields, each declared once with its default, rule and resume policy
(`config_fields`, the rules in `rules`), checked field by field (`config_checks`) from the command
line (`console`); the run built from it (`setup`) and its loop (`trainer`), with what is due when
(`schedule`), checkpoints and resuming (`checkpoints`, `resume`), metrics (`metrics`), the workdir
(`workdir`) and one-line failures (`failures`). The method itself is `hcsc_jax.method`."""
