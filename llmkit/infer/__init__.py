"""llmkit.infer"""
