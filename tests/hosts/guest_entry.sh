#!/bin/sh
# Run by the image's omv-harness unit from the share, so that it can change without a new image.
# The checkout comes as one tar: a single 9p read is many times quicker than a file-by-file copy.
started=$(cut -d' ' -f1 /proc/uptime)
rm -rf /opt/openmicrovm
mkdir -p /opt/openmicrovm
tar -x --no-same-owner -f /mnt/work/checkout.tar -C /opt/openmicrovm || exit 3
exec python3 -u /opt/openmicrovm/tests/hosts/guest_steps.py /mnt/work/job/job.json /mnt/results "$started"
