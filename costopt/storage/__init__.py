"""Where artifacts live and how they are versioned: the workspace layout (`layout`), the S3 endpoint (`s3`) and DVC (`dvc`)."""
