"""Why a run is slow: the rule engine over documented facts (`rules`), the rules' predicted
gain (`predicted_gain`) and the one facts builder every command calls (`facts_builder`).
Torch-free."""
