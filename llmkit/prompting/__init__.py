"""llmkit.prompting"""
