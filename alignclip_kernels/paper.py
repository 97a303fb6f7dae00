"""The AlignCLIP / CLIPood constants the ops default to, defined once (the authors' `main.py`).

The training package's configuration (`alignclip.config`) takes its loss defaults from here.
"""
MARGIN_ALPHA = 0.3       # CLIPood's margin metric softmax: logits − α · (t_y · t_c)
LOGIT_SCALE = 100.0      # CLIP's exp(logit_scale) for OpenAI weights (the trainer reads the model's)
LABEL_EPSILON = 0.9      # semantic label smoothing: the weight left on the true class
SMOOTHING = 35.0         # class relations: softmax(text textᵀ · smoothing)
TEMPERATURE = 1.0        # the AAL target G: softmax over patches of cos / temperature
ALIGN_WEIGHT = 10.0      # "aloss": total = SLS + aloss · (AAL + similarity alignment)
