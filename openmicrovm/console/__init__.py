"""The web console: static pages served at /console/ that call the public API from the browser,
as boto3 does (SigV4-signed when access keys are configured), plus the one route a browser needs
that a local CLI does not: uploading a code artifact zip (uploads.py)."""
