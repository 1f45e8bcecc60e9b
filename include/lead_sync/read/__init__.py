"""Reading: the sync configuration, the partition (a day in the sync time zone) and the source rows."""
