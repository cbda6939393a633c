"""The stages behind the CLI, one family of jobs sharing one skeleton (:mod:`hybrid.jobs.base`)."""
