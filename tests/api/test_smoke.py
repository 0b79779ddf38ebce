def test_root_group_exists_on_first_start(admin):
    groups = admin.get("/groups")
    assert [(g["name"], g["parent_id"], g["inherit"]) for g in groups] == [("My Company", None, False)]
    doc = admin.effective(groups[0]["id"])
    assert doc["serial"] >= 1
    assert doc["communication"] == {
        "mode": "push",
        "heartbeat_s": 300,
        "download_enabled": True,
        "randomize_s": 0,
    }
