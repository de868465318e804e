"""Memory: what every rank holds, predicted from the config alone and measured while training.

components.py   the components of a rank's memory and which one each parameter belongs to
skeleton.py     the model on the meta device, and what the prediction reads off it
activations.py  what each decoder layer saves for backward, per family
predict.py      bytes per component on every rank (`qlaunch budget`)
planner.py      which configurations fit, fastest first (`qlaunch plan`)
measure.py      what each rank really holds during training, next to the prediction
report.py       tables and plots; sizes.py: byte counts for people; commands.py: the two commands
"""
