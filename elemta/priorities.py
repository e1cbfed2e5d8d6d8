"""The priorities a message can have, most urgent first: the queue stores the index (0 =
critical, so ORDER BY priority puts urgent mail first), MT-PRIORITY (RFC 6710) maps onto them
and plugins may set them."""

PRIORITIES = ("critical", "high", "normal", "low")
