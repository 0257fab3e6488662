#!/bin/bash
# Session 13: the F2PAD results re-scored with the calibrated baseline at the bundle's calibrated pixel threshold
# (it used a class's tuned coarse threshold) and the resolution / amortisation recorded: session 12's commands,
# same bundles, into work/f2pad_s13.
OUT=work/f2pad_s13 exec bash "$(dirname "$0")/session12_refine_rescore.sh"
