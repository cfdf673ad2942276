"""The lesion classifier of gate G9: config, trainable backbones, metadata branch, recipe, calibration, serving."""
