# A Llama-2-7B-shaped GGUF of random weights quantized by gguf-py, for memory and load-time
# measurements (the values do not matter there). Tensors are generated and written one at a time.
# usage: VOCAB_GGUF=<llama.cpp>/models/ggml-vocab-llama-spm.gguf python3 synth_7b_gguf.py OUT TYPE
#   TYPE: Q4_0 or TQ2_0 for the blocks' matrices; token_embd is Q4_0, output Q8_0, norms F32.
#   Needs `pip install numpy gguf`; the vocabulary file comes with llama.cpp's sources.
import numpy as np, gguf, sys, os
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, quant_shape_to_byte_shape
V=gguf.GGUFReader(os.environ['VOCAB_GGUF'])
out=sys.argv[1]; lt=getattr(T, sys.argv[2]); L=32
d,ff,nh,nv,voc,rd=4096,11008,32,32,32000,128
w=gguf.GGUFWriter(out,'llama')
w.add_block_count(L); w.add_context_length(4096); w.add_embedding_length(d); w.add_feed_forward_length(ff)
w.add_head_count(nh); w.add_head_count_kv(nv); w.add_layer_norm_rms_eps(1e-5); w.add_rope_dimension_count(rd)
w.add_file_type(2 if lt==T.Q4_0 else 37)
f=V.fields
w.add_tokenizer_model(str(f['tokenizer.ggml.model'].contents()))
w.add_token_list([bytes(f['tokenizer.ggml.tokens'].parts[i]) for i in f['tokenizer.ggml.tokens'].data])
if 'tokenizer.ggml.scores' in f:
    w.add_token_scores([float(f['tokenizer.ggml.scores'].parts[i][0]) for i in f['tokenizer.ggml.scores'].data])
w.add_token_types([int(f['tokenizer.ggml.token_type'].parts[i][0]) for i in f['tokenizer.ggml.token_type'].data])
w.add_bos_token_id(int(f['tokenizer.ggml.bos_token_id'].contents())); w.add_eos_token_id(int(f['tokenizer.ggml.eos_token_id'].contents()))
specs=[('token_embd.weight',(voc,d),T.Q4_0),('output_norm.weight',(d,),T.F32),('output.weight',(voc,d),T.Q8_0)]
kv=nv*(d//nh)
for i in range(L):
    p=f'blk.{i}.'
    specs+=[(p+'attn_norm.weight',(d,),T.F32),(p+'ffn_norm.weight',(d,),T.F32)]
    for n,s in [('attn_q',(d,d)),('attn_k',(kv,d)),('attn_v',(kv,d)),('attn_output',(d,d)),('ffn_gate',(ff,d)),('ffn_up',(ff,d)),('ffn_down',(d,ff))]:
        specs.append((p+n+'.weight',s,lt))
for n,s,t in specs:
    if t==T.F32: w.add_tensor_info(n,s,np.dtype(np.float32),int(np.prod(s))*4)
    else:
        bs=quant_shape_to_byte_shape(s,t); w.add_tensor_info(n,bs,np.dtype(np.uint8),int(np.prod(bs)),raw_dtype=t)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
rng=np.random.default_rng(0)
for n,s,t in specs:
    if t==T.F32: a=np.ones(s,np.float32)
    else:
        rows=[]
        for r0 in range(0,s[0],1024):
            x=rng.standard_normal((min(1024,s[0]-r0),s[1]),dtype=np.float32)*0.02
            rows.append(quantize(x,t))
        a=np.concatenate(rows)
    w.write_tensor_data(a)
w.close(); print('ok')
