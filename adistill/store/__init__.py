"""Storage: tenant artifacts (files, `Teacher`, lineage) and the versioned registry over local folders and S3.

Nothing here imports `adistill.recipes`: a stored adapter does not depend on how it was trained."""
