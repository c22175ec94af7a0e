def add_model_commands(sub):
    pass
