"""llmkit.train"""
