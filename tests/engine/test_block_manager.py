from lightspeed.engine.block_manager import BlockManager


def test_allocate_grows_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5)  # 2 blocks
    assert len(bm.get_block_table("a")) == 2
    assert bm.allocate("a", 8)  # still 2
    assert len(bm.get_block_table("a")) == 2
    assert bm.allocate("a", 9)  # 3
    assert bm.num_free_blocks == 5
    assert bm.allocate("b", 20)  # 5 blocks: all the rest
    assert not bm.allocate("c", 1)
    assert "c" not in bm.block_tables or bm.get_block_table("c") == []
    assert len(set(bm.get_block_table("a")) | set(bm.get_block_table("b"))) == 8
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_failed_allocate_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.allocate("a", 4)
    before = list(bm.get_block_table("a"))
    assert not bm.allocate("a", 10)
    assert bm.get_block_table("a") == before and bm.num_free_blocks == 1
