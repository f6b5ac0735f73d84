"""_client"""
