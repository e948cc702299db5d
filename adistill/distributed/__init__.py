"""Everything that imports Ray: cluster plumbing (`common`), onboarding (Ray Train), tuning (Ray Tune) and
serving (Ray Serve). Nothing outside this package imports `ray`; only `adistill.cli` and `adistill.demo` import it."""
