"""Standing infrastructure (buckets, roles, networks) as Pulumi programs, run through the Automation API."""
